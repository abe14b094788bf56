"""Capture a DETR model as a ``torch.export`` program with dynamic batch, height and width.

Under ``torch.export`` every :class:`~detr_irpe.irpe.RPEMultiheadAttention` takes its export path
(:func:`detr_irpe.irpe.attention.choose_impl`): explicit attention weights, and iRPE bucket ids
computed inside the graph from the feature map's symbolic ``(h, w)``, so the program is right for
every input size, not only the one it was traced with. A segmentation model (``model.masks``)
also outputs ``pred_masks``, its mask head computed in the graph on the padded batch as DETR does.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn
from torch.export import Dim, ExportedProgram

from ..irpe import RPEMultiheadAttention
from ..models.position_encoding import PositionEmbeddingLearned
from ..models.segmentation import DETRsegm

INPUT_NAMES = ("images", "mask")
OUTPUT_NAMES = ("pred_logits", "pred_boxes")  # of every export
MASK_OUTPUT = "pred_masks"  # a segmentation model's third output


def output_names(model: nn.Module) -> Tuple[str, ...]:
    """The outputs an export of ``model`` has: :data:`OUTPUT_NAMES`, then ``pred_masks`` for a
    segmentation model (one with a mask head)."""
    return OUTPUT_NAMES + ((MASK_OUTPUT,) if isinstance(model, DETRsegm) else ())


class DetectorOutputs(nn.Module):
    """A DETR model as an export sees it: two tensors in, the final decoder layer's tensors out.

    ``forward(images (B, 3, H, W) float, mask (B, H, W) bool, True = padding)`` returns
    ``pred_logits (B, Q, K + 1)`` and ``pred_boxes (B, Q, 4)`` (normalised cxcywh), and for a
    segmentation model ``pred_masks (B, Q, H4, W4)`` (mask logits at stride 4 of the padded batch);
    the auxiliary outputs of the other decoder layers are left out.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        # a shallow copy shares every parameter and submodule; only its aux_loss flag is its own (the
        # auxiliary outputs are not computed, not even as dead code, which torch.export.save cannot
        # serialise for a single decoder layer)
        self.model = copy.copy(model)
        self.model.aux_loss = False
        self.names = output_names(model)

    def forward(self, images: Tensor, mask: Tensor) -> Tuple[Tensor, ...]:
        out = self.model(images, mask)
        return tuple(out[name] for name in self.names)


@dataclass(frozen=True)
class InputLimits:
    """The input sizes an exported program accepts (pixels, per side).

    ``min_side`` is ``stride + 1``: a feature map of one cell is a special case ``torch.export``
    does not trace. ``max_side`` is None, or ``stride * 50`` with a learned position embedding
    (it has embeddings for 50 rows and 50 columns).
    """

    min_side: int
    max_side: Optional[int]

    @classmethod
    def of(cls, model: nn.Module) -> "InputLimits":
        stride = model.backbone.stride
        position = model.backbone[1]
        max_side = None
        if isinstance(position, PositionEmbeddingLearned):
            max_side = stride * min(position.row_embed.num_embeddings, position.col_embed.num_embeddings)
        return cls(stride + 1, max_side)

    def sample_sizes(self, stride: int) -> List[Tuple[int, int]]:
        """Two ``(H, W)`` inside the limits, different from each other and not multiples of the stride:
        the first is traced, the second checks the exported program."""
        sizes = [(4 * stride + 3, 6 * stride + 5), (5 * stride + 7, 3 * stride + 2)]
        if self.max_side is not None:
            sizes = [(min(h, self.max_side), min(w, self.max_side)) for h, w in sizes]
        return sizes


def encoder_irpe_specs(model: nn.Module) -> List[Optional[str]]:
    """The iRPE spec of every encoder self-attention, None for a plain one."""
    return [layer.self_attn.rpe_config.spec if isinstance(layer.self_attn, RPEMultiheadAttention)
            and layer.self_attn.rpe_config is not None else None
            for layer in model.transformer.encoder.layers]


def sample_inputs(batch: int, size: Tuple[int, int], padded: bool = True, seed: int = 0) -> Tuple[Tensor, Tensor]:
    """Random ``images (B, 3, H, W)`` and ``mask (B, H, W)``; with ``padded``, every image after the
    first has its bottom / right part marked as padding (and zeroed, as the package pads)."""
    generator = torch.Generator().manual_seed(seed)
    h, w = size
    images = torch.randn(batch, 3, h, w, generator=generator)
    mask = torch.zeros(batch, h, w, dtype=torch.bool)
    if padded:
        for i in range(1, batch):
            valid_h, valid_w = max(1, h - (i * h) // (batch + 1)), max(1, w - (i * w) // (2 * batch))
            mask[i, valid_h:] = True
            mask[i, :, valid_w:] = True
    return images.masked_fill(mask[:, None], 0.0), mask


def dynamic_shapes(limits: InputLimits) -> Dict[str, Dict[int, Dim]]:
    """``torch.export`` dynamic axes: batch, height and width of ``images`` and ``mask``."""
    batch = Dim("batch", min=1)
    height = Dim("height", min=limits.min_side, max=limits.max_side)
    width = Dim("width", min=limits.min_side, max=limits.max_side)
    return {"images": {0: batch, 2: height, 3: width}, "mask": {0: batch, 1: height, 2: width}}


def export_program(model: nn.Module) -> ExportedProgram:
    """``torch.export`` the final predictions of ``model`` (in eval mode, on the CPU, in float32).

    Returns a program with inputs ``images (batch, 3, height, width)`` float32 and ``mask
    (batch, height, width)`` bool and outputs ``pred_logits``, ``pred_boxes`` (and ``pred_masks``
    for a segmentation model, :func:`output_names`); batch, height and width are dynamic within
    :class:`InputLimits`.
    """
    limits = InputLimits.of(model)
    images, mask = sample_inputs(2, limits.sample_sizes(model.backbone.stride)[0])
    return torch.export.export(DetectorOutputs(model.eval()), (images, mask), dynamic_shapes=dynamic_shapes(limits))
