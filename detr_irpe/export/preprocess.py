"""The evaluation preprocessing, described by numbers a deployment can read from the sidecar JSON.

It is :func:`detr_irpe.data.transforms.model_input_transform` (tested equal, bit for bit): the
resize of torchvision's ``RandomShortestSize`` with one scale, bilinear and antialiased, then
``uint8 / 255`` and ImageNet mean / std normalisation.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import torch
from torch import Tensor
from torchvision.transforms.v2 import functional as F

from ..data.transforms import IMAGENET_MEAN, IMAGENET_STD
from ..errors import UsageError


@dataclass(frozen=True)
class Preprocessing:
    """Resize (shortest side ``eval_size``, longest at most ``max_size``) and normalise.

    Attributes:
        eval_size: target of the shorter side, in pixels.
        max_size: cap on the longer side, in pixels.
        mean, std: per RGB channel, applied to the image scaled to ``[0, 1]``.
    """

    eval_size: int
    max_size: int
    mean: Tuple[float, float, float] = IMAGENET_MEAN
    std: Tuple[float, float, float] = IMAGENET_STD

    def resized_size(self, height: int, width: int) -> Tuple[int, int]:
        """``(h, w)`` an image of ``height x width`` is resized to: both sides times
        ``s = min(eval_size / shorter, max_size / longer)``, truncated; a side that would become
        0 pixels is rounded instead and kept at 1 or more."""
        scale = min(self.eval_size / min(height, width), self.max_size / max(height, width))
        h, w = int(height * scale), int(width * scale)
        if h >= 1 and w >= 1:
            return h, w
        return max(1, round(height * scale)), max(1, round(width * scale))

    def __call__(self, image: Tensor) -> Tensor:
        """``(3, H, W)`` uint8 RGB (or float in [0, 1], resized as float, as the evaluation transform
        does) -> ``(3, h, w)`` float32, normalised."""
        if image.dim() != 3 or image.shape[0] != 3 or not (image.dtype == torch.uint8 or image.is_floating_point()):
            raise UsageError(f"expected a (3, H, W) uint8 (or float in [0, 1]) RGB image, got {tuple(image.shape)} "
                             f"{image.dtype}")
        image = F.resize(image, list(self.resized_size(*image.shape[-2:])), antialias=True)
        return F.normalize(F.to_dtype(image, torch.float32, scale=True), list(self.mean), list(self.std))

    def to_dict(self) -> dict:
        return {"eval_size": self.eval_size, "max_size": self.max_size, "mean": list(self.mean),
                "std": list(self.std)}

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocessing":
        return cls(int(d["eval_size"]), int(d["max_size"]), tuple(map(float, d["mean"])), tuple(map(float, d["std"])))
