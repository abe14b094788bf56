"""The DETR detector: backbone, transformer and the class / box prediction heads."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..structures import pad_images
from .transformer import Transformer


class MLP(nn.Module):
    """``num_layers`` linear layers with ReLU between them (keys ``layers.0``, ``layers.1``, ...)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(n, k) for n, k in zip(dims[:-1], dims[1:]))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


@dataclass
class DecoderPass:
    """One pass of a batch through the backbone and the transformer: what the heads read.

    Attributes:
        hs: every decoder layer's output ``(num_decoder_layers, B, Q, C)``.
        memory: the encoder output ``(B, C, h, w)``.
        projected: the transformer's input, ``input_proj`` of the last feature map ``(B, C, h, w)``.
        levels: the backbone's ``[(features, mask)]``: the stride 4, 8 and 16 features when asked
            for (``interm``), then the last feature map; masks ``(B, h_l, w_l)``, True = padding.
        attention: the attention maps (``return_attention``), else None.
        groups: query groups in this pass (Group DETR training), else 1.
    """

    hs: Tensor
    memory: Tensor
    projected: Tensor
    levels: List[Tuple[Tensor, Tensor]]
    attention: Optional[Dict[str, List[Tensor]]] = None
    groups: int = 1

    @property
    def mask(self) -> Tensor:
        """``(B, h, w)`` padding mask of the transformer's feature map."""
        return self.levels[-1][1]


class DETR(nn.Module):
    """DEtection TRansformer: a fixed set of ``num_queries`` predictions per image.

    Args:
        backbone: a :class:`~detr_irpe.models.backbone.Joiner` (CNN + position encoding).
        transformer: the encoder-decoder :class:`~detr_irpe.models.transformer.Transformer`.
        num_classes: number of object classes K; the class head has K + 1 outputs, the last one
            being "no object". (COCO checkpoints use 91: the largest category id + 1.)
        num_queries: object queries, i.e. the maximum number of detections per image.
        aux_loss: also return the predictions of every intermediate decoder layer.
        query_groups: in training, ``query_groups - 1`` more groups of ``num_queries`` queries
            (``group_query_embed``), hidden from each other in the decoder's self-attention and
            matched to the targets one group at a time (Group DETR; the criterion needs the same
            number). Evaluation and inference use the first group only, ``query_embed``: the model
            is then DETR. 1 (the default) is DETR in training too.
    """

    def __init__(self, backbone: nn.Module, transformer: Transformer, num_classes: int, num_queries: int,
                 aux_loss: bool = True, query_groups: int = 1):
        super().__init__()
        hidden_dim = transformer.d_model
        self.backbone = backbone
        self.transformer = transformer
        self.input_proj = nn.Conv2d(backbone.num_channels, hidden_dim, kernel_size=1)
        self.query_embed = nn.Embedding(num_queries, hidden_dim)
        self.class_embed = nn.Linear(hidden_dim, num_classes + 1)
        self.bbox_embed = MLP(hidden_dim, hidden_dim, 4, 3)
        self.num_classes = num_classes
        self.num_queries = num_queries
        self.aux_loss = aux_loss
        self.query_groups = query_groups
        if query_groups > 1:  # training-only queries; checkpoints for inference leave them out
            self.group_query_embed = nn.Embedding(num_queries * (query_groups - 1), hidden_dim)

    def forward(self, images: Union[Tensor, Sequence[Tensor]], mask: Optional[Tensor] = None,
                return_attention: bool = False, batched_backbone: bool = True) -> Dict[str, object]:
        """Predict boxes for a batch of images.

        Args:
            images: a list of normalised ``(3, H_i, W_i)`` images (padded here), or a padded
                batch ``(B, 3, H, W)``.
            mask: ``(B, H, W)`` bool, True on padding, for a padded batch; None = no padding.
            return_attention: add ``"attention"`` (see ``Transformer.forward``) and the
                feature-map size ``"feature_hw"`` to the output.
            batched_backbone: run the CNN on the padded batch, as DETR does (training, export);
                False runs it on each image unpadded (see ``Joiner.forward``), so that an image's
                detections do not depend on the batch: what every inference entry point does
                unless it is given ``batched_backbone=True`` (``--batched-backbone``).

        Returns:
            ``pred_logits`` ``(B, Q, K + 1)``, ``pred_boxes`` ``(B, Q, 4)`` normalised
            ``(cx, cy, w, h)`` relative to each image's unpadded size, and, with ``aux_loss``,
            ``aux_outputs``: the same two entries for every decoder layer but the last. In
            training with query groups, ``Q = num_queries * query_groups`` (group by group) and
            ``query_groups`` says so.
        """
        images, mask = _as_batch(images, mask)
        return self.head_outputs(self.run(images, mask, return_attention, batched_backbone))

    def run(self, images: Tensor, mask: Tensor, return_attention: bool = False, batched_backbone: bool = True,
            interm: bool = False) -> DecoderPass:
        """Backbone and transformer on a padded batch ``(B, 3, H, W)`` with its mask ``(B, H, W)``
        (arguments as :meth:`forward`; ``interm``: keep the backbone's stride 4, 8, 16 features too)."""
        levels, pos = self.backbone.levels(images, mask, batched_backbone, interm)
        features, mask = levels[-1]
        queries, query_mask, groups = self.query_embed.weight, None, 1
        if self.training and self.query_groups > 1:
            groups = self.query_groups
            queries = torch.cat([queries, self.group_query_embed.weight])
            query_mask = group_mask(self.num_queries, groups, queries.device)
        projected = self.input_proj(features)
        hs, memory, attention = self.transformer(projected, mask, queries, pos, return_attention=return_attention,
                                                 query_mask=query_mask)
        return DecoderPass(hs, memory, projected, levels, attention, groups)

    def head_outputs(self, run: DecoderPass, aux_loss: Optional[bool] = None) -> Dict[str, object]:
        """The output dict of :meth:`forward` from a :meth:`run` (``aux_loss`` overrides the model's)."""
        logits = self.class_embed(run.hs)  # (L, B, Q, K + 1)
        boxes = self.bbox_embed(run.hs).sigmoid()  # (L, B, Q, 4)
        out: Dict[str, object] = {"pred_logits": logits[-1], "pred_boxes": boxes[-1]}
        if self.aux_loss if aux_loss is None else aux_loss:
            out["aux_outputs"] = [{"pred_logits": a, "pred_boxes": b} for a, b in zip(logits[:-1], boxes[:-1])]
        if run.attention is not None:
            out["attention"] = run.attention
            out["feature_hw"] = tuple(run.projected.shape[-2:])
        if run.groups > 1:
            out["query_groups"] = run.groups
        return out


def group_mask(num_queries: int, groups: int, device=None) -> Tensor:
    """``(Q G, Q G)`` bool, True between queries of different groups (self-attention not allowed)."""
    group = torch.arange(num_queries * groups, device=device) // num_queries
    return group[:, None] != group[None, :]


def _as_batch(images: Union[Tensor, Sequence[Tensor]], mask: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    """A padded ``(B, 3, H, W)`` batch and its ``(B, H, W)`` mask from either accepted input form."""
    if isinstance(images, Tensor):
        if images.dim() != 4:
            raise ValueError(f"expected a padded batch (B, 3, H, W) or a list of (3, H, W) images, "
                             f"got a tensor of shape {tuple(images.shape)}")
        if mask is None:
            mask = torch.zeros(images.shape[0], *images.shape[2:], dtype=torch.bool, device=images.device)
        elif mask.shape != (images.shape[0], *images.shape[2:]):
            raise ValueError(f"mask shape {tuple(mask.shape)} does not match the images "
                             f"{tuple(images.shape)}; expected (B, H, W)")
        return images, mask.to(torch.bool)
    if mask is not None:
        raise ValueError("pass mask only with a padded batch tensor; a list of images is padded here")
    return pad_images(list(images))
