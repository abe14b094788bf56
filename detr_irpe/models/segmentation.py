"""DETR's instance segmentation: a mask per query from the attention of its decoder output over
the encoder memory, refined by an FPN-style convolutional head over the backbone's features.

:class:`DETRsegm` wraps a :class:`~detr_irpe.models.detr.DETR` as ``detr`` beside
``bbox_attention`` (:class:`MHAttentionMap`) and ``mask_head`` (:class:`MaskHeadSmallConv`): the
state-dict keys of official DETR's segmentation and panoptic checkpoints (``detr.*``,
``bbox_attention.*``, ``mask_head.*``). Everything else reads it as a DETR: same forward
signature, same outputs plus ``pred_masks``, and ``backbone``, ``transformer``, ``num_classes``,
``num_queries``... are those of ``detr``.
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .detr import DETR, DecoderPass, _as_batch

GROUPS = 8  # groups of the mask head's GroupNorms, as in DETR (see group_norm)


def group_norm(channels: int) -> nn.GroupNorm:
    """DETR's ``GroupNorm(8, channels)``; for a narrower head, whose widths 8 does not divide (the CPU
    demo's hidden_dim 64 with 4 heads: 68 and 4 channels), the largest group count dividing both 8
    and ``channels``. The group count holds no weights: the state dict is the same either way."""
    return nn.GroupNorm(math.gcd(GROUPS, channels), channels)


class MHAttentionMap(nn.Module):
    """Multi-head attention weights of queries over a feature map, without values (no output projection).

    The softmax runs over heads and positions together, as in DETR: each query's weights over
    all ``heads x h x w`` entries sum to 1.

    Args:
        query_dim: channels of the queries and of the feature map.
        hidden_dim: channels after the query / key projections, split over ``num_heads``.
        num_heads: heads.
    """

    def __init__(self, query_dim: int, hidden_dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q_linear = nn.Linear(query_dim, hidden_dim)
        self.k_linear = nn.Linear(query_dim, hidden_dim)  # applied per pixel, as a 1x1 convolution
        for linear in (self.q_linear, self.k_linear):
            nn.init.xavier_uniform_(linear.weight)
            nn.init.zeros_(linear.bias)
        self.scale = float(hidden_dim / num_heads) ** -0.5

    def forward(self, queries: Tensor, features: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        """queries ``(B, Q, C)``, features ``(B, C, h, w)``, mask ``(B, h, w)`` True on padding ->
        weights ``(B, Q, heads, h, w)`` (zero on padding)."""
        q = self.q_linear(queries)
        k = F.conv2d(features, self.k_linear.weight[:, :, None, None], self.k_linear.bias)
        q = q.unflatten(-1, (self.num_heads, -1))  # (B, Q, heads, D)
        k = k.unflatten(1, (self.num_heads, -1))  # (B, heads, D, h, w)
        logits = torch.einsum("bqnc,bnchw->bqnhw", q * self.scale, k)
        if mask is not None:
            logits = logits.masked_fill(mask[:, None, None], float("-inf"))
        return F.softmax(logits.flatten(2), dim=-1).view_as(logits)


class MaskHeadSmallConv(nn.Module):
    """DETR's mask head: convolutions with group norm, upsampled FPN-style over three backbone levels.

    Each query's input is the transformer's feature map with that query's attention maps
    (``heads`` channels) appended. After two 3x3 convolutions, three times: add the adapted
    (1x1 convolution) backbone feature of the next finer level to the nearest-upsampled map,
    then a 3x3 convolution. A last convolution gives one logit per pixel, at the finest level's
    size (stride 4).

    Args:
        dim: input channels (``hidden_dim + heads``).
        fpn_dims: channels of the backbone levels, coarsest first (ResNet-50: 1024, 512, 256).
        context_dim: ``hidden_dim``; the inner widths are ``context_dim / 2, 4, 8, 16``.
    """

    def __init__(self, dim: int, fpn_dims: Sequence[int], context_dim: int):
        super().__init__()
        widths = [dim] + [context_dim // f for f in (2, 4, 8, 16)]
        self.lay1 = nn.Conv2d(dim, dim, 3, padding=1)
        self.gn1 = group_norm(dim)
        for i in range(2, 6):  # lay2..lay5, gn2..gn5
            setattr(self, f"lay{i}", nn.Conv2d(widths[i - 2], widths[i - 1], 3, padding=1))
            setattr(self, f"gn{i}", group_norm(widths[i - 1]))
        self.out_lay = nn.Conv2d(widths[4], 1, 3, padding=1)
        for i, fpn_dim in enumerate(fpn_dims, start=1):  # adapter1..adapter3, to widths 1..3
            setattr(self, f"adapter{i}", nn.Conv2d(fpn_dim, widths[i], 1))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_uniform_(m.weight, a=1)
                nn.init.zeros_(m.bias)

    def forward(self, features: Tensor, attention: Tensor, fpns: Sequence[Tensor]) -> Tensor:
        """features ``(B, hidden_dim, h, w)``, attention ``(B, Q, heads, h, w)``, fpns: the backbone
        levels coarsest first, ``(B, fpn_dims[i], h_i, w_i)`` -> mask logits ``(B * Q, 1, h_3, w_3)``."""
        queries = attention.shape[1]
        x = torch.cat([features.repeat_interleave(queries, dim=0), attention.flatten(0, 1)], 1)
        x = F.relu(self.gn1(self.lay1(x)))
        x = F.relu(self.gn2(self.lay2(x)))
        for i, fpn in enumerate(fpns, start=1):
            lateral = getattr(self, f"adapter{i}")(fpn).repeat_interleave(queries, dim=0)
            x = lateral + F.interpolate(x, size=lateral.shape[-2:], mode="nearest")
            x = F.relu(getattr(self, f"gn{i + 2}")(getattr(self, f"lay{i + 2}")(x)))
        return self.out_lay(x)


class DETRsegm(nn.Module):
    """DETR with a mask per query (DETR's ``DETRsegm``).

    Args:
        detr: the detector; its backbone must provide the stride 4, 8 and 16 features
            (``interm_channels``).
        freeze_detr: freeze ``detr`` at once (see :meth:`freeze_detr`).

    ``forward`` takes what :meth:`DETR.forward` takes and returns its outputs plus:

    * ``pred_masks`` ``(B, Q, H4, W4)``: mask logits at stride 4, for the last decoder layer only
      (the auxiliary outputs have none, as in DETR).
    * ``input_sizes`` ``(B, 2)`` int64: each image's unpadded ``(h, w)`` at the model's input.
    * with ``batched_backbone=False``, ``pred_masks_sizes`` ``(B, 2)`` int64: the mask head then
      runs on each image's own region (its group norms would otherwise see the padding), so that
      an image's masks do not depend on its batch; image ``i``'s masks are
      ``pred_masks[i, :, :rows, :cols]``, zero beyond.
    """

    def __init__(self, detr: DETR, freeze_detr: bool = False):
        super().__init__()
        if detr.query_groups != 1:
            raise ValueError(f"the mask head predicts a mask per query of DETR: build the detector with "
                             f"query_groups=1, not {detr.query_groups}")
        fpn_dims = tuple(reversed(detr.backbone[0].interm_channels))
        if len(fpn_dims) != 3:
            raise ValueError("the mask head needs backbone features at strides 4, 8 and 16; this backbone "
                             f"has them at {len(fpn_dims)} of these strides")
        self.detr = detr
        self.detr_frozen = False
        if freeze_detr:
            self.freeze_detr()
        hidden_dim, nheads = detr.transformer.d_model, detr.transformer.nhead
        self.bbox_attention = MHAttentionMap(hidden_dim, hidden_dim, nheads)
        self.mask_head = MaskHeadSmallConv(hidden_dim + nheads, fpn_dims, hidden_dim)
        # its own flag, as DETR's: a shallow copy (an export) turns it off without touching ``detr``
        self.aux_loss = detr.aux_loss

    # -- what the rest of the package reads from a DETR --------------------------------------------
    backbone = property(lambda self: self.detr.backbone)
    transformer = property(lambda self: self.detr.transformer)
    input_proj = property(lambda self: self.detr.input_proj)
    query_embed = property(lambda self: self.detr.query_embed)
    class_embed = property(lambda self: self.detr.class_embed)
    bbox_embed = property(lambda self: self.detr.bbox_embed)
    num_classes = property(lambda self: self.detr.num_classes)
    num_queries = property(lambda self: self.detr.num_queries)
    query_groups = property(lambda self: self.detr.query_groups)

    def freeze_detr(self) -> None:
        """Stop training ``detr``: its parameters get ``requires_grad=False`` (the second stage of
        DETR's recipe, which trains the mask head alone), and its batch norms keep their running
        statistics in training mode (ResNets use frozen batch norm anyway)."""
        for p in self.detr.parameters():
            p.requires_grad_(False)
        self.detr_frozen = True
        self.train(self.training)

    def train(self, mode: bool = True) -> "DETRsegm":
        super().train(mode)
        if self.detr_frozen:
            for m in self.detr.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def forward(self, images: Union[Tensor, Sequence[Tensor]], mask: Optional[Tensor] = None,
                return_attention: bool = False, batched_backbone: bool = True) -> Dict[str, object]:
        """See the class and :meth:`DETR.forward`."""
        images, mask = _as_batch(images, mask)
        run = self.detr.run(images, mask, return_attention, batched_backbone, interm=True)
        out = self.detr.head_outputs(run, aux_loss=self.aux_loss)
        out["input_sizes"] = region_sizes(mask)
        if batched_backbone:
            out["pred_masks"] = self.masks(run)
        else:
            out["pred_masks"], out["pred_masks_sizes"] = self.masks_per_image(run)
        return out

    def masks(self, run: DecoderPass) -> Tensor:
        """Mask logits ``(B, Q, H4, W4)`` of the padded batch, as DETR computes them."""
        (fine, _), (middle, _), (coarse, _) = run.levels[:3]
        attention = self.bbox_attention(run.hs[-1], run.memory, mask=run.mask)
        masks = self.mask_head(run.projected, attention, [coarse, middle, fine])
        # (B Q, 1, H4, W4) -> (B, Q, H4, W4) without a reshape across the size-1 channel, which
        # torch.export could not prove valid for every dynamic height
        return masks[:, 0].unflatten(0, attention.shape[:2])

    def masks_per_image(self, run: DecoderPass) -> Tuple[Tensor, Tensor]:
        """Mask logits ``(B, Q, H4, W4)``, each image's computed on its own region of every level and
        padded with zeros, and the size of each image's region ``(B, 2)``."""
        attention = self.bbox_attention(run.hs[-1], run.memory, mask=run.mask)
        levels = run.levels[:3] + [(run.projected, run.mask)]
        sizes = [region_sizes(m) for _, m in levels]  # per level (B, 2)
        fine = levels[0][0]
        out = fine.new_zeros(attention.shape[0], attention.shape[1], *fine.shape[-2:])
        for i in range(attention.shape[0]):
            own = [f[i:i + 1, :, :int(s[i, 0]), :int(s[i, 1])] for (f, _), s in zip(levels, sizes)]
            h, w = (int(v) for v in sizes[-1][i])
            masks = self.mask_head(own[3], attention[i:i + 1, :, :, :h, :w], [own[2], own[1], own[0]])
            out[i, :, :masks.shape[-2], :masks.shape[-1]] = masks[:, 0]
        return out, sizes[0]


def region_sizes(mask: Tensor) -> Tensor:
    """``(B, 2)`` int64: the ``(rows, cols)`` each image's region covers in a ``(B, H, W)`` padding mask
    (True on padding; images sit at the top left)."""
    valid = ~mask
    return torch.stack([valid.any(2).sum(1), valid.any(1).sum(1)], dim=1)


__all__ = ["DETRsegm", "MHAttentionMap", "MaskHeadSmallConv", "group_norm", "region_sizes"]
