"""One forward pass of a detector on one image, keeping what the pictures need.

Images are resized like evaluation images (``model_input_transform``), run as a batch of one
and the detections mapped back to the original image's pixels. The sizes needed to map an
attention map back onto the image are kept: the feature grid covers the padded input tensor
uniformly (the padding mask is resized to it by nearest-neighbour interpolation, see
``models.backbone.mask_to_feature``), and the image occupies its top-left ``input_hw`` part.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.transforms import model_input_transform


@dataclass
class ForwardResult:
    """The model's view of one image.

    Attributes:
        image: ``(3, H, W)`` uint8, the original image.
        input_hw: ``(h, w)`` of the resized image fed to the model (its valid region).
        padded_hw: ``(h_pad, w_pad)`` of the padded input tensor (``>= input_hw``).
        feature_hw: ``(fh, fw)`` of the feature grid the encoder attends over.
        scores, labels, boxes: per query, ``(Q,)``, ``(Q,)``, ``(Q, 4)`` absolute xyxy in ``image``.
        attention: ``{"encoder": [(HW, HW)] per layer, "decoder": [(Q, HW)] per layer}``
            head-averaged, or None.
        original_hw: ``(H, W)`` of the original image; ``image`` and ``boxes`` may be drawn larger
            (see :meth:`scaled`), but pixel coordinates given by users refer to the original image.
        masks: ``(Q, H, W)`` bool, each query's mask over ``image``, for a segmentation model; else None.
    """

    image: Tensor
    input_hw: Tuple[int, int]
    padded_hw: Tuple[int, int]
    feature_hw: Tuple[int, int]
    scores: Tensor
    labels: Tensor
    boxes: Tensor
    attention: Optional[Dict[str, list]] = None
    original_hw: Optional[Tuple[int, int]] = None
    masks: Optional[Tensor] = None

    def __post_init__(self):
        if self.original_hw is None:
            self.original_hw = self.image_hw

    @property
    def image_hw(self) -> Tuple[int, int]:
        return int(self.image.shape[1]), int(self.image.shape[2])

    def scaled(self, factor: float) -> "ForwardResult":
        """The same result drawn ``factor`` times larger (image resized bilinearly, boxes scaled, masks
        resized nearest)."""
        if factor == 1:
            return self
        H, W = self.image_hw
        size = (max(1, round(H * factor)), max(1, round(W * factor)))
        image = F.interpolate(self.image[None].float(), size=size, mode="bilinear", align_corners=False)
        image = image[0].round().clamp(0, 255).to(torch.uint8)
        fy, fx = size[0] / H, size[1] / W
        boxes = self.boxes * torch.tensor([fx, fy, fx, fy])
        masks = self.masks
        if masks is not None:
            masks = F.interpolate(masks[None].float(), size=size, mode="nearest")[0].bool()
        return dataclasses.replace(self, image=image, boxes=boxes, masks=masks)

    def detections(self, threshold: float = 0.7, max_detections: Optional[int] = None) -> Dict[str, Tensor]:
        """Queries scoring at least ``threshold``, best first: ``queries`` (indices), ``boxes``, ``labels``,
        ``scores``, and ``masks`` for a segmentation model."""
        keep = torch.nonzero(self.scores >= threshold).flatten()
        keep = keep[self.scores[keep].argsort(descending=True)]
        if max_detections is not None:
            keep = keep[:max_detections]
        found = {"queries": keep, "boxes": self.boxes[keep], "labels": self.labels[keep], "scores": self.scores[keep]}
        if self.masks is not None:
            found["masks"] = self.masks[keep]
        return found


def display_scale(image_hw: Tuple[int, int], min_size: Optional[int]) -> float:
    """Factor that brings the shorter side of an image up to ``min_size`` pixels (1 if it is already
    that large, or ``min_size`` is None / 0): small images get readable labels."""
    if not min_size:
        return 1.0
    return max(1.0, float(min_size) / min(image_hw))


def prepare_input(image: Tensor, data_cfg) -> Tuple[Tensor, Tensor]:
    """A ``(3, H, W)`` uint8 image as the model's ``(1, 3, h, w)`` batch and ``(1, h, w)`` mask."""
    if image.dim() != 3 or image.shape[0] != 3 or image.dtype != torch.uint8:
        raise ValueError(f"expected a (3, H, W) uint8 RGB image, got {tuple(image.shape)} {image.dtype}")
    batch = model_input_transform(data_cfg)(image).unsqueeze(0)
    mask = torch.zeros(1, *batch.shape[-2:], dtype=torch.bool)
    return batch, mask


@torch.no_grad()
def run_model(model: nn.Module, postprocessor: nn.Module, data_cfg, image: Tensor, device="cpu",
              return_attention: bool = False) -> ForwardResult:
    """Run ``model`` on one ``(3, H, W)`` uint8 image (evaluation resize, batch of one)."""
    batch, mask = prepare_input(image, data_cfg)
    batch, mask = batch.to(device), mask.to(device)
    model.eval()
    outputs = model(batch, mask, return_attention=return_attention)
    h, w = image.shape[-2:]
    det = postprocessor(outputs, torch.tensor([[h, w]], device=device))[0]
    attention = None
    if return_attention:
        attention = {k: [m[0].float().cpu() for m in v] for k, v in outputs["attention"].items()}
    valid = ~mask[0]
    input_hw = (int(valid.any(1).sum()), int(valid.any(0).sum()))
    feature_hw = tuple(int(s) for s in outputs["feature_hw"]) if "feature_hw" in outputs else None
    return ForwardResult(image=image, input_hw=input_hw, padded_hw=tuple(batch.shape[-2:]), feature_hw=feature_hw,
                         scores=det["scores"].cpu(), labels=det["labels"].cpu(), boxes=det["boxes"].cpu(),
                         attention=attention, masks=det["masks"].cpu() if "masks" in det else None)
