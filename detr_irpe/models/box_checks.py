"""Validation of normalised ``(cx, cy, w, h)`` boxes before they reach the matcher and losses.

A degenerate box (negative width or height, NaN or inf) would otherwise surface as a NaN
loss or a cryptic failure in ``linear_sum_assignment``, far from its cause.
"""
from __future__ import annotations

from typing import Dict, List

import torch
from torch import Tensor
from torchvision.ops import box_convert

from ..errors import DetrIrpeError

_HINTS = {
    "prediction": "Predicted boxes come from a sigmoid, so a non-finite value means the model diverged "
                  "(lower the learning rate, check AMP / gradient clipping).",
    "target": "Target boxes must be normalised (cx, cy, w, h) with w >= 0 and h >= 0; check the dataset "
              "annotations and the augmentation that produced this box.",
}


def at_least_float32(x: Tensor) -> Tensor:
    """``x`` in float32 if it is a lower-precision float (autocast outputs), else unchanged: a
    float64 model keeps float64 losses and costs."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


class DegenerateBoxError(DetrIrpeError, ValueError):
    """A prediction or target box is degenerate (x2 < x1, y2 < y1, or a NaN / inf value).

    Attributes:
        source: ``"prediction"`` or ``"target"``.
        image_index: index of the image in the batch.
        box_index: index of the box in that image (query index for predictions).
        box: the offending ``(cx, cy, w, h)`` values.
    """

    def __init__(self, source: str, image_index: int, box_index: int, box: List[float]):
        self.source, self.image_index, self.box_index, self.box = source, image_index, box_index, box
        cx, cy, w, h = box
        xyxy = [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]
        problems = []
        if not all(map(_is_finite, box)):
            problems.append("non-finite value")
        if w < 0:
            problems.append("x2 < x1")
        if h < 0:
            problems.append("y2 < y1")
        super().__init__(
            f"degenerate {source} box ({', '.join(problems)}) in image {image_index} of the batch, box "
            f"{box_index}: (cx, cy, w, h) = ({_fmt(box)}), i.e. (x1, y1, x2, y2) = ({_fmt(xyxy)}). "
            f"{_HINTS[source]}")


def _is_finite(v: float) -> bool:
    return v == v and abs(v) != float("inf")


def _fmt(values: List[float]) -> str:
    return ", ".join(f"{v:.4g}" for v in values)


def degenerate(boxes: Tensor) -> Tensor:
    """``(..., 4)`` cxcywh boxes -> ``(...)`` bool, True where a box is degenerate."""
    return ~torch.isfinite(boxes).all(-1) | (boxes[..., 2] < 0) | (boxes[..., 3] < 0)


def check_boxes(pred_boxes: Tensor, targets: List[Dict[str, Tensor]]) -> None:
    """Raise :class:`DegenerateBoxError` for the first degenerate box.

    Args:
        pred_boxes: ``(B, Q, 4)`` predicted cxcywh boxes.
        targets: per image a dict with ``boxes`` ``(N_i, 4)`` cxcywh.
    """
    bad = degenerate(pred_boxes)
    if bad.any():
        image, query = bad.nonzero()[0].tolist()
        raise DegenerateBoxError("prediction", image, query, pred_boxes[image, query].tolist())
    for image, target in enumerate(targets):
        bad = degenerate(target["boxes"])
        if bad.any():
            index = int(bad.nonzero()[0, 0])
            raise DegenerateBoxError("target", image, index, target["boxes"][index].tolist())


def cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    return box_convert(boxes, in_fmt="cxcywh", out_fmt="xyxy")
