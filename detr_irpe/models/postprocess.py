"""Turn DETR's raw outputs into scored boxes (and, for a segmentation model, masks) in original image pixels."""
from __future__ import annotations

from typing import Dict, List

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .box_checks import cxcywh_to_xyxy


class PostProcessSegm(nn.Module):
    """Binary masks at each image's original size from ``pred_masks`` (mask logits at stride 4).

    As DETR's ``PostProcessSegm``: the logits are upsampled (bilinear) to the model's input
    size, thresholded (``sigmoid > threshold``), cropped to the image and resized (nearest) to its
    original size. Two cases, by what the outputs hold:

    * ``pred_masks`` of a padded batch (``batched_backbone=True``): DETR's procedure exactly, the
      padded map upsampled to the largest input size of the batch, then each image cropped.
    * ``pred_masks_sizes`` given (``batched_backbone=False``: the mask head ran on each image
      alone): each image's own region is upsampled to its own input size, so that its masks do
      not depend on the batch. For an image alone both are the same.
    """

    def __init__(self, threshold: float = 0.5):
        super().__init__()
        self.threshold = threshold

    @torch.no_grad()
    def forward(self, outputs: Dict[str, Tensor], target_sizes: Tensor) -> List[Tensor]:
        """
        Args:
            outputs: ``pred_masks`` ``(B, Q, h, w)``, ``input_sizes`` ``(B, 2)`` each image's unpadded
                ``(height, width)`` at the model's input, optionally ``pred_masks_sizes`` ``(B, 2)``.
            target_sizes: ``(B, 2)`` each image's original ``(height, width)``.

        Returns:
            Per image ``(Q, height, width)`` bool masks.
        """
        logits = outputs["pred_masks"].float()
        input_sizes = [tuple(int(v) for v in s) for s in outputs["input_sizes"]]
        own = outputs.get("pred_masks_sizes")
        padded = tuple(max(s[d] for s in input_sizes) for d in (0, 1))
        results = []
        for i, ((h, w), original) in enumerate(zip(input_sizes, torch.as_tensor(target_sizes).tolist())):
            if own is None:
                region, size = logits[i:i + 1], padded
            else:
                rows, cols = (int(v) for v in own[i])
                region, size = logits[i:i + 1, :, :rows, :cols], (h, w)
            upsampled = F.interpolate(region, size=size, mode="bilinear", align_corners=False)
            masks = (upsampled.sigmoid() > self.threshold)[0, :, :h, :w]
            masks = F.interpolate(masks[:, None].float(), size=tuple(int(v) for v in original), mode="nearest")
            results.append(masks[:, 0].bool())
        return results


class PostProcess(nn.Module):
    """Scores, labels and absolute ``(x1, y1, x2, y2)`` boxes for every query of every image, and
    the masks of a segmentation model's outputs (those with ``pred_masks``, see :class:`PostProcessSegm`).

    The score of a query is its highest softmax probability among the real classes ("no object"
    is excluded from the max but still takes part in the softmax), its label that class.
    """

    def __init__(self, mask_threshold: float = 0.5):
        super().__init__()
        self.segm = PostProcessSegm(mask_threshold)

    @torch.no_grad()
    def forward(self, outputs: Dict[str, Tensor], target_sizes: Tensor) -> List[Dict[str, Tensor]]:
        """
        Args:
            outputs: ``pred_logits`` ``(B, Q, K+1)`` and ``pred_boxes`` ``(B, Q, 4)`` normalised cxcywh;
                a segmentation model's ``pred_masks`` and ``input_sizes`` too.
            target_sizes: ``(B, 2)`` each image's original ``(height, width)`` in pixels.

        Returns:
            Per image ``{"scores": (Q,), "labels": (Q,) int64, "boxes": (Q, 4)}`` in pixels, plus
            ``"masks": (Q, height, width)`` bool when the outputs have ``pred_masks``.
        """
        logits, boxes = outputs["pred_logits"].float(), outputs["pred_boxes"].float()
        target_sizes = torch.as_tensor(target_sizes, device=logits.device)
        if target_sizes.shape != (logits.shape[0], 2):
            raise ValueError(f"target_sizes must be (B, 2) = ({logits.shape[0]}, 2) rows of (height, width), "
                             f"got shape {tuple(target_sizes.shape)}")
        scores, labels = logits.softmax(-1)[..., :-1].max(-1)
        h, w = target_sizes.float().unbind(1)
        scale = torch.stack([w, h, w, h], dim=1)[:, None, :]
        boxes = cxcywh_to_xyxy(boxes) * scale
        results = [{"scores": s, "labels": l, "boxes": b} for s, l, b in zip(scores, labels, boxes)]
        if "pred_masks" in outputs:
            for result, masks in zip(results, self.segm(outputs, target_sizes)):
                result["masks"] = masks
        return results
