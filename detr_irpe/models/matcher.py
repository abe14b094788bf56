"""Hungarian matching between the fixed set of predictions and each image's target boxes."""
from __future__ import annotations

from typing import Dict, List, Tuple

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn
from torchvision.ops import generalized_box_iou

from .box_checks import at_least_float32, check_boxes, cxcywh_to_xyxy


class HungarianMatcher(nn.Module):
    """One-to-one assignment of predictions to targets minimising DETR's matching cost.

    ``cost = cost_class * (-p(target class)) + cost_bbox * L1(boxes) + cost_giou * (-GIoU)``.
    The cost is computed once for the whole batch (every prediction against every target of
    every image), then split per image and solved with ``linear_sum_assignment``.

    Args:
        cost_class, cost_bbox, cost_giou: weights of the three terms (DETR: 1, 5, 2).
    """

    def __init__(self, cost_class: float = 1.0, cost_bbox: float = 5.0, cost_giou: float = 2.0):
        super().__init__()
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("all matching costs are 0; at least one of cost_class, cost_bbox, cost_giou must be > 0")
        self.cost_class = cost_class
        self.cost_bbox = cost_bbox
        self.cost_giou = cost_giou

    @torch.no_grad()
    def cost_matrix(self, outputs: Dict[str, Tensor], targets: List[Dict[str, Tensor]]) -> Tensor:
        """Matching cost of every prediction against every target of the batch.

        Returns ``(B, Q, sum_i N_i)`` (at least float32) on the predictions' device; image ``i``'s block is
        the ``N_i`` columns of its targets.
        """
        logits, boxes = at_least_float32(outputs["pred_logits"]), at_least_float32(outputs["pred_boxes"])
        if len(targets) != logits.shape[0]:
            raise ValueError(f"got {len(targets)} target dicts for a batch of {logits.shape[0]} images")
        check_boxes(boxes, targets)
        b, q = logits.shape[:2]
        prob = logits.flatten(0, 1).softmax(-1)  # (B*Q, K+1)
        out_boxes = boxes.flatten(0, 1)  # (B*Q, 4)
        tgt_labels = torch.cat([t["labels"] for t in targets]).to(logits.device, torch.int64)
        tgt_boxes = torch.cat([t["boxes"] for t in targets]).to(logits.device, boxes.dtype)
        cost = (self.cost_bbox * torch.cdist(out_boxes, tgt_boxes, p=1)
                - self.cost_class * prob[:, tgt_labels]
                - self.cost_giou * generalized_box_iou(cxcywh_to_xyxy(out_boxes), cxcywh_to_xyxy(tgt_boxes)))
        return cost.view(b, q, -1)

    @torch.no_grad()
    def forward(self, outputs: Dict[str, Tensor], targets: List[Dict[str, Tensor]]) -> List[Tuple[Tensor, Tensor]]:
        """Match predictions to targets.

        Args:
            outputs: ``pred_logits`` ``(B, Q, K+1)`` and ``pred_boxes`` ``(B, Q, 4)`` (cxcywh, normalised).
            targets: per image ``labels`` ``(N_i,)`` int64 and ``boxes`` ``(N_i, 4)`` (cxcywh, normalised).

        Returns:
            Per image ``(pred_idx, tgt_idx)``, two int64 CPU tensors of length ``min(Q, N_i)``
            (empty for an image without targets): prediction ``pred_idx[k]`` is matched to
            target ``tgt_idx[k]``.

        Raises:
            DegenerateBoxError: a prediction or target box is degenerate.
        """
        with torch.autocast(outputs["pred_logits"].device.type, enabled=False):
            cost = self.cost_matrix(outputs, targets).cpu()
        sizes = [len(t["boxes"]) for t in targets]
        indices = []
        for i, block in enumerate(cost.split(sizes, dim=-1)):
            rows, cols = linear_sum_assignment(block[i].numpy())
            indices.append((torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)))
        return indices

    def extra_repr(self) -> str:
        return f"cost_class={self.cost_class}, cost_bbox={self.cost_bbox}, cost_giou={self.cost_giou}"
