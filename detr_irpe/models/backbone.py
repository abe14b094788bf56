"""CNN backbones that turn a padded image batch into one feature map plus its padding mask.

Every backbone here has the same interface: ``num_channels`` (channels of the output feature
map), ``stride`` (32, or 16 for a dilated last stage or ``tiny``) and ``forward(images, mask) -> (features,
mask)``. The module holding the layers is always ``body`` so checkpoint keys read
``backbone.0.body.*`` once the backbone sits inside :class:`Joiner`.

DETR's mask head also reads the features at strides 4, 8 and 16 (ResNet's ``layer1``-``layer3``):
``levels(images, mask, interm=True)`` returns them before the last feature map, each with its
padding mask; ``interm_channels`` are their channel counts.
"""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import List, Tuple

import torch
import torchvision
from torch import Tensor, nn
from torchvision.ops import FrozenBatchNorm2d

from ..config import ConfigError
from ..errors import CheckpointError, CheckpointNotFoundError
from .checkpointing import checkpointed

RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101")
BACKBONES = RESNETS + ("tiny",)
# ResNet stages that are trained when the backbone is trained (DETR freezes the stem and layer1).
TRAINABLE_STAGES = ("layer2", "layer3", "layer4")


def mask_to_feature(mask: Tensor, size: Tuple[int, int]) -> Tensor:
    """Nearest-neighbour resize of a padding mask ``(B, H, W)`` bool to ``size = (h, w)``.

    Picks the cells ``F.interpolate(mode="nearest")`` picks (tested), from explicit indices: an
    exported ``Resize`` (ONNX) divides by ``h / H`` instead of multiplying by ``H / h`` and can
    land one cell earlier, moving the padding border.
    """
    rows = _nearest_source_indices(mask.shape[1], size[0], mask.device)
    cols = _nearest_source_indices(mask.shape[2], size[1], mask.device)
    return mask.index_select(1, rows).index_select(2, cols)


def _nearest_source_indices(n_in: int, n_out: int, device) -> Tensor:
    """``(n_out,)`` long: ``min(floor(i * s), n_in - 1)`` with ``s = n_in / n_out`` in float32, as torch's
    nearest interpolation computes it. Built from tensors so that symbolic sizes stay symbolic."""
    scale = torch.full((), n_in, dtype=torch.float32, device=device) / n_out
    source = (torch.arange(n_out, dtype=torch.float32, device=device) * scale).floor().long()
    return source.clamp(max=n_in - 1)


Level = Tuple[Tensor, Tensor]  # features (B, C, h, w) and their padding mask (B, h, w), True = padding


class _Backbone(nn.Module):
    """What every backbone shares: ``body`` (an ``nn.Sequential`` of named stages), ``interm_layers``
    (the stages whose outputs are the stride 4, 8 and 16 features) and their ``interm_channels``.

    ``checkpointing`` (see :func:`~detr_irpe.models.checkpointing.set_activation_checkpointing`):
    in training, recompute in backward each block of the ``block_stages`` and each other stage
    that trains or sees a tensor that needs gradients."""

    interm_layers: Tuple[str, ...] = ()
    interm_channels: Tuple[int, ...] = ()
    block_stages: Tuple[str, ...] = ()  # stages made of blocks, checkpointed one block at a time
    checkpointing: bool = False

    def forward(self, images: Tensor, mask: Tensor) -> Tuple[Tensor, Tensor]:
        """images ``(B, 3, H, W)``, mask ``(B, H, W)`` bool (True = padding) -> features
        ``(B, num_channels, h, w)`` and their mask ``(B, h, w)``."""
        features = self._stages(images)[-1] if self._checkpointing_now() else self.body(images)
        return features, mask_to_feature(mask, features.shape[-2:])

    def levels(self, images: Tensor, mask: Tensor, interm: bool = False) -> List[Level]:
        """``[(features, mask)]`` of the last stage, preceded with ``interm`` by those of
        ``interm_layers`` (strides 4, 8, 16), each mask resized from ``mask`` as in :meth:`forward`."""
        if not interm:
            return [self(images, mask)]
        return [(f, mask_to_feature(mask, f.shape[-2:])) for f in self._stages(images, interm=True)]

    def _checkpointing_now(self) -> bool:
        return self.checkpointing and self.training and torch.is_grad_enabled()

    def _stages(self, images: Tensor, interm: bool = False) -> List[Tensor]:
        """The body's stages one by one (the same modules, in the same order, as ``body(images)``):
        the last output, preceded with ``interm`` by those of ``interm_layers``."""
        outputs, x = [], images
        checkpointing = self._checkpointing_now()
        for name, stage in self.body.named_children():
            if not checkpointing:
                x = stage(x)
            else:
                for unit in (stage.children() if name in self.block_stages else [stage]):
                    trains = x.requires_grad or any(p.requires_grad for p in unit.parameters())
                    x = checkpointed(unit, x) if trains else unit(x)
            if interm and name in self.interm_layers:
                outputs.append(x)
        outputs.append(x)
        return outputs


class ResNetBackbone(_Backbone):
    """A torchvision ResNet up to its last stage (stride 32, or 16 with ``dilation``).

    Batch norm is frozen (``FrozenBatchNorm2d``: statistics and affine parameters are buffers).
    The stem and ``layer1`` are never trained; ``layer2``-``layer4`` are trained only when
    ``train_backbone`` is True.

    Args:
        name: one of ``resnet18``, ``resnet34``, ``resnet50``, ``resnet101``.
        weights: ``"imagenet"`` (torchvision's IMAGENET1K_V1, downloaded), ``"none"`` (random
            init) or the path of a torchvision-format ResNet state dict.
        train_backbone: train layer2-4 (False freezes every parameter).
        dilation: replace the stride of the last stage by dilation (DETR's DC5).
    """

    def __init__(self, name: str = "resnet50", weights: str = "imagenet", train_backbone: bool = True,
                 dilation: bool = False):
        super().__init__()
        if name not in RESNETS:
            raise ConfigError(f"unknown ResNet {name!r}; choose one of {', '.join(RESNETS)}")
        if dilation and name in ("resnet18", "resnet34"):
            raise ConfigError(f"dilation (DC5) needs a bottleneck ResNet (resnet50 or resnet101); "
                             f"torchvision's {name} does not support it")
        resnet = torchvision.models.get_model(name, weights=None, norm_layer=FrozenBatchNorm2d,
                                              replace_stride_with_dilation=[False, False, dilation])
        if _wants_weights(weights):
            _load_resnet_weights(resnet, name, weights)
        self.body = nn.Sequential(OrderedDict(
            (child, getattr(resnet, child))
            for child in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")
        ))
        for pname, param in self.body.named_parameters():
            if not train_backbone or not pname.startswith(TRAINABLE_STAGES):
                param.requires_grad_(False)
        basic = name in ("resnet18", "resnet34")
        self.num_channels = 512 if basic else 2048
        self.stride = 16 if dilation else 32
        self.interm_layers = ("layer1", "layer2", "layer3")
        self.interm_channels = (64, 128, 256) if basic else (256, 512, 1024)
        self.block_stages = ("layer1", "layer2", "layer3", "layer4")  # of BasicBlocks / Bottlenecks


def _wants_weights(weights: str) -> bool:
    return str(weights).lower() != "none"


def _load_resnet_weights(resnet: nn.Module, name: str, weights: str) -> None:
    """Load ``weights`` (``imagenet`` or a local file path) into a full torchvision ResNet."""
    state = _resnet_state_dict(name, weights)
    try:
        resnet.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"backbone_weights={weights!r} is not a torchvision {name} state dict: {e}") from None


def _resnet_state_dict(name: str, weights: str) -> dict:
    """The state dict named by ``weights``: ``imagenet`` (download) or a local file path."""
    if str(weights).lower() == "imagenet":
        enum = torchvision.models.get_model_weights(name).IMAGENET1K_V1
        try:
            return enum.get_state_dict(progress=True, check_hash=True, weights_only=True)
        except OSError as e:  # URLError and socket errors are OSErrors
            raise CheckpointError(
                f"could not download the ImageNet weights of {name} from {enum.url} ({e}). "
                f"Without network access, either pass backbone_weights=none (random init) or download "
                f"that file elsewhere and pass its local path as backbone_weights=/path/to/{Path(enum.url).name}"
            ) from e
    return _read_state_file(weights, f"is neither 'imagenet', 'none' nor an existing file. Pass a "
                                     f"torchvision-format {name} state dict (e.g. {name}-*.pth from download.pytorch.org)")


def _read_state_file(weights: str, hint: str) -> dict:
    """The state dict saved at path ``weights`` (unwrapped from ``{"state_dict": ...}``).

    A missing file raises ``CheckpointNotFoundError`` and an unreadable one ``CheckpointError``; both
    messages read ``backbone_weights=<weights> <hint>``.
    """
    path = Path(weights).expanduser()
    if not path.is_file():
        raise CheckpointNotFoundError(f"backbone_weights={weights!r} {hint}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"backbone_weights={weights!r} could not be read as a PyTorch file ({e}); "
                           f"{hint}") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    return state


class TinyBackbone(_Backbone):
    """A small plain CNN trained from scratch: seven conv-BN-ReLU layers, stride 16.

    Meant for CPU demos where a ResNet is too slow. Batch norm is the ordinary trainable kind.
    It has no ImageNet weights; :func:`detr_irpe.engine.pretrain.pretrain_backbone` pretrains it
    on the image-level labels of a detection dataset (what ``make demo`` does first) and saves a
    state dict that ``weights`` accepts.

    Args:
        weights: ``"none"`` (random init) or the path of a state dict of this class.
        train_backbone: False freezes every parameter.
        layers: ``(out_channels, stride)`` per layer; the last channel count is ``num_channels``.
    """

    LAYERS = ((16, 2), (32, 2), (32, 1), (64, 2), (64, 1), (128, 2), (128, 1))

    def __init__(self, weights: str = "none", train_backbone: bool = True,
                 layers: Tuple[Tuple[int, int], ...] = LAYERS):
        super().__init__()
        stages, in_ch, stride = OrderedDict(), 3, 1
        for i, (out_ch, layer_stride) in enumerate(layers):
            stages[f"stage{i}"] = nn.Sequential(OrderedDict(
                conv=nn.Conv2d(in_ch, out_ch, 3, stride=layer_stride, padding=1, bias=False),
                bn=nn.BatchNorm2d(out_ch),
                relu=nn.ReLU(inplace=True),
            ))
            in_ch, stride = out_ch, stride * layer_stride
        self.body = nn.Sequential(stages)
        if _wants_weights(weights):
            _load_tiny_weights(self, weights)
        for param in self.body.parameters():
            param.requires_grad_(train_backbone)
        self.num_channels = in_ch
        self.stride = stride
        # the last stage at each of the strides 4, 8 and 16 (the mask head's inputs)
        last_at = {}
        total = 1
        for i, (out_ch, layer_stride) in enumerate(layers):
            total *= layer_stride
            last_at[total] = (f"stage{i}", out_ch)
        found = [last_at[s] for s in (4, 8, 16) if s in last_at]
        self.interm_layers = tuple(name for name, _ in found)
        self.interm_channels = tuple(ch for _, ch in found)


def _load_tiny_weights(backbone: TinyBackbone, weights: str) -> None:
    if str(weights).lower() == "imagenet":
        raise ConfigError("the tiny backbone has no ImageNet weights; set backbone_weights=none (random init) or "
                         "to a file written by tools/pretrain_backbone.py")
    state = _read_state_file(weights, "is neither 'none' nor a readable file; for the tiny backbone pass a "
                                      "file written by tools/pretrain_backbone.py")
    try:
        backbone.load_state_dict(state, strict=True)
    except (RuntimeError, TypeError, AttributeError) as e:
        raise CheckpointError(f"backbone_weights={weights!r} is not a state dict of the tiny backbone "
                           f"({type(e).__name__}: {str(e)[:500]}); write it with tools/pretrain_backbone.py") from None


class Joiner(nn.Sequential):
    """Backbone followed by the position encoding of its feature map.

    An ``nn.Sequential`` only so that state-dict keys are ``backbone.0.*`` (the CNN) and
    ``backbone.1.*`` (a learned position embedding), as in DETR checkpoints.
    """

    def __init__(self, backbone: nn.Module, position_embedding: nn.Module):
        super().__init__(backbone, position_embedding)
        self.num_channels = backbone.num_channels
        self.stride = backbone.stride

    def forward(self, images: Tensor, mask: Tensor, batched_backbone: bool = True) -> Tuple[Tensor, Tensor, Tensor]:
        """Returns features ``(B, C, h, w)``, mask ``(B, h, w)`` and position ``(B, hidden_dim, h, w)``.

        ``batched_backbone``: run the CNN on the padded batch, as DETR does (the default here, for
        training). False: run it on each image's own region (the top-left part its mask leaves
        unpadded), so that no convolution sees another image's padding; the feature maps are then
        padded to a common size, with the mask. An image's features, and so its detections, then do
        not depend on what it is batched with.
        """
        levels, pos = self.levels(images, mask, batched_backbone)
        features, mask = levels[-1]
        return features, mask, pos

    def levels(self, images: Tensor, mask: Tensor, batched_backbone: bool = True,
               interm: bool = False) -> Tuple[List[Level], Tensor]:
        """:meth:`forward` with every level: ``[(features, mask)]`` of the last feature map, preceded
        with ``interm`` by the stride 4, 8 and 16 features (see the CNN's ``levels``), and the
        position encoding of the last. With ``batched_backbone=False`` each level is padded from the
        images' own feature maps, and its mask says each image's own region."""
        if not batched_backbone and images.shape[0] > 1:
            levels = self._levels_per_image(images, mask, interm)
        else:
            levels = self[0].levels(images, mask, interm)
        features, mask = levels[-1]
        return levels, self[1](mask).to(features.dtype)

    def _levels_per_image(self, images: Tensor, mask: Tensor, interm: bool) -> List[Level]:
        parts = []
        for image, pad in zip(images, mask):
            rows, cols = (~pad).any(1).nonzero(), (~pad).any(0).nonzero()
            h = int(rows[-1]) + 1 if len(rows) else 1
            w = int(cols[-1]) + 1 if len(cols) else 1
            parts.append(self[0].levels(image[None, :, :h, :w], pad[None, :h, :w], interm))
        return [_pad_level([part[level] for part in parts], mask.device) for level in range(len(parts[0]))]


def _pad_level(parts: List[Level], device) -> Level:
    """One level of every image, ``[((1, C, h_i, w_i), (1, h_i, w_i))]``, padded at the bottom / right
    into ``(B, C, h, w)`` zeros and a ``(B, h, w)`` mask, True on the padding."""
    height = max(f.shape[-2] for f, _ in parts)
    width = max(f.shape[-1] for f, _ in parts)
    first = parts[0][0]
    features = first.new_zeros(len(parts), first.shape[1], height, width)
    feature_mask = torch.ones(len(parts), height, width, dtype=torch.bool, device=device)
    for i, (f, m) in enumerate(parts):
        features[i, :, : f.shape[-2], : f.shape[-1]] = f[0]
        feature_mask[i, : f.shape[-2], : f.shape[-1]] = m[0]
    return features, feature_mask


def build_backbone(name: str, weights: str = "none", train_backbone: bool = True,
                   dilation: bool = False) -> nn.Module:
    """A backbone by name (``resnet18/34/50/101`` or ``tiny``); see the classes for the arguments."""
    if name == "tiny":
        if dilation:
            raise ConfigError("dilation (DC5) applies to ResNet backbones only, not to 'tiny'")
        return TinyBackbone(weights, train_backbone=train_backbone)
    if name in RESNETS:
        return ResNetBackbone(name, weights, train_backbone, dilation)
    raise ConfigError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")
