"""Turn DETR's raw outputs into scored boxes in original image pixels."""
from __future__ import annotations

from typing import Dict, List

import torch
from torch import Tensor, nn

from .box_checks import cxcywh_to_xyxy


class PostProcess(nn.Module):
    """Scores, labels and absolute ``(x1, y1, x2, y2)`` boxes for every query of every image.

    The score of a query is its highest softmax probability among the real classes ("no object"
    is excluded from the max but still takes part in the softmax), its label that class.
    """

    @torch.no_grad()
    def forward(self, outputs: Dict[str, Tensor], target_sizes: Tensor) -> List[Dict[str, Tensor]]:
        """
        Args:
            outputs: ``pred_logits`` ``(B, Q, K+1)`` and ``pred_boxes`` ``(B, Q, 4)`` normalised cxcywh.
            target_sizes: ``(B, 2)`` each image's original ``(height, width)`` in pixels.

        Returns:
            Per image ``{"scores": (Q,), "labels": (Q,) int64, "boxes": (Q, 4)}`` in pixels.
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
        return [{"scores": s, "labels": l, "boxes": b} for s, l, b in zip(scores, labels, boxes)]
