"""DETR's set prediction loss: Hungarian matching, then classification, box and (segmentation) mask losses."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import generalized_box_iou_loss, sigmoid_focal_loss

from ..config import ConfigError

from .box_checks import at_least_float32, cxcywh_to_xyxy
from .matcher import HungarianMatcher

Targets = List[Dict[str, Tensor]]
Indices = List[Tuple[Tensor, Tensor]]


def detr_weight_dict(ce_loss_coef: float = 1.0, bbox_loss_coef: float = 5.0, giou_loss_coef: float = 2.0,
                     num_aux: int = 0, masks: bool = False, mask_loss_coef: float = 1.0,
                     dice_loss_coef: float = 1.0) -> Dict[str, float]:
    """Loss weights for the final layer and ``num_aux`` auxiliary decoder layers (suffix ``_i``);
    with ``masks`` also ``loss_mask`` and ``loss_dice``, of the final layer only (the auxiliary
    outputs have no masks, as in DETR)."""
    final = {"loss_ce": ce_loss_coef, "loss_bbox": bbox_loss_coef, "loss_giou": giou_loss_coef}
    weights = dict(final)
    for i in range(num_aux):
        weights.update({f"{k}_{i}": v for k, v in final.items()})
    if masks:
        weights.update({"loss_mask": mask_loss_coef, "loss_dice": dice_loss_coef})
    return weights


def dice_loss(logits: Tensor, targets: Tensor, num_boxes: float) -> Tensor:
    """DICE loss ``1 - (2 |p t| + 1) / (|p| + |t| + 1)`` of each row (``p = sigmoid(logits)``), summed
    over the rows and divided by ``num_boxes``. ``logits``, ``targets``: ``(N, pixels)``."""
    probs = logits.sigmoid()
    numerator = 2 * (probs * targets).sum(1)
    denominator = probs.sum(1) + targets.sum(1)
    return (1 - (numerator + 1) / (denominator + 1)).sum() / num_boxes


def focal_loss(logits: Tensor, targets: Tensor, num_boxes: float, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """Sigmoid focal loss (RetinaNet) averaged over the pixels of each row, summed over the rows and
    divided by ``num_boxes``. ``logits``, ``targets``: ``(N, pixels)``."""
    loss = sigmoid_focal_loss(logits, targets, alpha=alpha, gamma=gamma, reduction="none")
    return loss.mean(1).sum() / num_boxes


@dataclass(frozen=True)
class LossNormalizers:
    """What the losses are divided by, given to :meth:`SetCriterion.forward` from outside for a batch
    that one call sees only part of: micro-batches of one optimizer step (gradient accumulation),
    shards of processes. Each call's losses are then its share of the whole batch's, and summing
    them (as backward does across micro-batches, and DDP's gradient mean across processes, with
    the divisors below) gives the loss of the whole batch.

    Attributes:
        num_boxes: divisor of ``loss_bbox``, ``loss_giou``, ``loss_mask`` and ``loss_dice`` (times the
            query groups, as the criterion's own): DETR's number of target boxes.
        class_weight: divisor of the summed weighted cross-entropy ``loss_ce``: the sum of the
            cross-entropy weights over the queries of the batch (:meth:`SetCriterion.batch_counts`).
    """

    num_boxes: float
    class_weight: float


class SetCriterion(nn.Module):
    """Losses of DETR's predictions against the targets they are matched to.

    For every decoder layer (the final one and each entry of ``aux_outputs``) the predictions
    are matched to the targets, then:

    * ``loss_ce``: cross-entropy over all queries; unmatched ones target "no object"
      (class ``num_classes``), whose weight is ``eos_coef``: the weighted mean over the batch.
    * ``loss_bbox``: L1 between matched (cx, cy, w, h) boxes, summed and divided by the number
      of target boxes (averaged over processes).
    * ``loss_giou``: ``1 - GIoU`` of matched boxes, normalised the same way.
    * ``cardinality_error`` (logged, no gradient): |number of non-"no object" predictions -
      number of targets|, averaged over images.
    * ``class_error`` (final layer only, logged): 100 - top-1 accuracy (%) on matched queries.
    * ``loss_mask`` and ``loss_dice`` (final layer only, when the outputs have ``pred_masks``): the
      matched masks, upsampled bilinearly to the targets' padded size, against the target masks
      (padded with zeros to the largest image of the batch): sigmoid focal loss (alpha 0.25,
      gamma 2) averaged over pixels, and DICE loss; each summed over the matched masks and
      normalised like the box losses.

    Auxiliary layer ``i`` gets the same keys with suffix ``_i``. Outputs with ``query_groups``
    G (Group DETR training) are matched group by group, each target once per group, and the box
    losses divided by G times the number of boxes: every loss is the mean over groups of one
    group's DETR loss (the cross-entropy too, each group holding the same number of matched and
    unmatched queries). ``cardinality_error`` counts the first group. Everything is computed in
    at least float32, also under autocast (a float64 model gets float64 losses).

    ``normalizers`` (:class:`LossNormalizers`) replace the batch's own divisors of the weighted
    mean and of the box losses, for a batch split into micro-batches or across processes.

    Args:
        num_classes: K, without "no object".
        matcher: a :class:`HungarianMatcher`.
        weight_dict: weight of each loss key in the total (see :func:`detr_weight_dict`).
        eos_coef: cross-entropy weight of the "no object" class.
    """

    def __init__(self, num_classes: int, matcher: HungarianMatcher, weight_dict: Dict[str, float],
                 eos_coef: float = 0.1):
        super().__init__()
        self.num_classes = num_classes
        self.matcher = matcher
        self.weight_dict = dict(weight_dict)
        self.eos_coef = eos_coef
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = eos_coef
        self.register_buffer("empty_weight", empty_weight)

    def forward(self, outputs: Dict[str, object], targets: Targets,
                normalizers: Optional[LossNormalizers] = None) -> Dict[str, Tensor]:
        """Compute all losses and logged metrics.

        Args:
            outputs: the model's output dict (``pred_logits``, ``pred_boxes``, optional ``aux_outputs``).
            targets: per image ``labels`` ``(N_i,)`` int64 in ``[0, num_classes)`` and ``boxes``
                ``(N_i, 4)`` normalised cxcywh; for outputs with ``pred_masks`` also ``masks``
                ``(N_i, H_i, W_i)`` (uint8 or bool) at the image's size.
            normalizers: the divisors of a larger batch this one is part of; None: this batch's own
                (the box count averaged over processes, the cross-entropy's weighted mean), as DETR.

        Returns:
            A dict of scalar tensors; combine with :meth:`weighted_loss`.
        """
        self._check_labels(targets)
        device = outputs["pred_logits"].device
        groups = outputs.get("query_groups", 1)
        with torch.autocast(device.type, enabled=False):
            if normalizers is None:
                num_boxes, class_weight = self._num_boxes(targets, device) * groups, None
            else:
                num_boxes, class_weight = normalizers.num_boxes * groups, normalizers.class_weight
            losses, indices = self._layer_losses(outputs, targets, num_boxes, groups, class_weight)
            losses["class_error"] = self.class_error(at_least_float32(outputs["pred_logits"]), targets, indices)
            if "pred_masks" in outputs:
                losses.update(self.loss_masks(at_least_float32(outputs["pred_masks"]), targets, indices, num_boxes))
            for i, aux in enumerate(outputs.get("aux_outputs", [])):
                aux_losses, _ = self._layer_losses(aux, targets, num_boxes, groups, class_weight)
                losses.update({f"{k}_{i}": v for k, v in aux_losses.items()})
        return losses

    def batch_counts(self, targets: Targets, num_queries: int, groups: int = 1) -> Tuple[float, float]:
        """``(target boxes, cross-entropy weight)`` of a batch, from its targets alone: what
        :class:`LossNormalizers` sums over micro-batches and processes.

        The weight is the sum over the ``B x num_queries x groups`` queries of their class weight:
        1 for a matched query, ``eos_coef`` for the others. The matcher matches ``min(Q, N_i)``
        queries of image ``i`` in each group (every target once when ``N_i <= Q``), so the sum is
        ``groups * sum_i (m_i + eos_coef * (Q - m_i))`` with ``m_i = min(Q, N_i)``, known before
        the forward pass.
        """
        eos = float(self.empty_weight[-1])  # eos_coef as the loss weighs it (a float32 buffer)
        boxes, weight = 0, 0.0
        for t in targets:
            matched = min(num_queries, len(t["labels"]))
            boxes += len(t["labels"])
            weight += groups * (matched + eos * (num_queries - matched))
        return float(boxes), weight

    def weighted_loss(self, losses: Dict[str, Tensor]) -> Tensor:
        """The training objective: ``sum(weight_dict[k] * losses[k])`` over the weighted keys present."""
        return sum(losses[k] * w for k, w in self.weight_dict.items() if k in losses)

    # -- one decoder layer ------------------------------------------------------------------

    def _layer_losses(self, outputs: Dict[str, Tensor], targets: Targets, num_boxes: float,
                      groups: int = 1, class_weight: Optional[float] = None) -> Tuple[Dict[str, Tensor], Indices]:
        logits, boxes = at_least_float32(outputs["pred_logits"]), at_least_float32(outputs["pred_boxes"])
        indices = self.match_groups(logits, boxes, targets, groups)
        losses = {
            "loss_ce": self.loss_labels(logits, targets, indices, class_weight),
            **self.loss_boxes(boxes, targets, indices, num_boxes),
            "cardinality_error": self.cardinality_error(logits[:, : logits.shape[1] // groups], targets),
        }
        return losses, indices

    def match_groups(self, logits: Tensor, boxes: Tensor, targets: Targets, groups: int = 1) -> Indices:
        """The matcher's one-to-one assignment, for each of ``groups`` equal groups of queries on its
        own (Group DETR): every target is matched once per group. Query indices count over all
        groups, ``(B, Q G, ...)``."""
        if groups == 1:
            return self.matcher({"pred_logits": logits, "pred_boxes": boxes}, targets)
        size = logits.shape[1] // groups
        per_group = [self.matcher({"pred_logits": logits[:, g * size:(g + 1) * size],
                                   "pred_boxes": boxes[:, g * size:(g + 1) * size]}, targets) for g in range(groups)]
        return [(torch.cat([rows + g * size for g, (rows, _) in enumerate(image)]),
                 torch.cat([cols for _, cols in image])) for image in zip(*per_group)]

    def loss_labels(self, logits: Tensor, targets: Targets, indices: Indices,
                    class_weight: Optional[float] = None) -> Tensor:
        """Weighted cross-entropy of ``logits`` ``(B, Q, K+1)``; unmatched queries target no-object.
        The weighted mean over the batch, or the weighted sum divided by ``class_weight``."""
        batch_idx, query_idx = _matched(indices)
        target_classes = torch.full(logits.shape[:2], self.num_classes, dtype=torch.int64, device=logits.device)
        target_classes[batch_idx, query_idx] = _matched_labels(targets, indices, logits.device)
        weight = self.empty_weight.to(logits.dtype)
        if class_weight is None:
            return F.cross_entropy(logits.transpose(1, 2), target_classes, weight)
        return F.cross_entropy(logits.transpose(1, 2), target_classes, weight, reduction="sum") / class_weight

    def loss_boxes(self, boxes: Tensor, targets: Targets, indices: Indices, num_boxes: float) -> Dict[str, Tensor]:
        """L1 and GIoU losses of matched boxes ``(B, Q, 4)``, each summed and divided by ``num_boxes``."""
        batch_idx, query_idx = _matched(indices)
        src = boxes[batch_idx, query_idx]
        tgt = torch.cat([t["boxes"][j] for t, (_, j) in zip(targets, indices)]).to(boxes.device, boxes.dtype)
        loss_bbox = F.l1_loss(src, tgt, reduction="sum") / num_boxes
        loss_giou = generalized_box_iou_loss(cxcywh_to_xyxy(src), cxcywh_to_xyxy(tgt), reduction="sum") / num_boxes
        return {"loss_bbox": loss_bbox, "loss_giou": loss_giou}

    def loss_masks(self, masks: Tensor, targets: Targets, indices: Indices, num_boxes: float) -> Dict[str, Tensor]:
        """Focal and DICE losses of the matched masks of ``masks`` ``(B, Q, h, w)`` (logits), each summed
        and divided by ``num_boxes``."""
        if any("masks" not in t for t in targets):
            raise ConfigError("the model predicts masks (model.masks=true) but the targets have none: load the "
                              "dataset with masks (build_dataset(..., masks=True))")
        batch_idx, query_idx = _matched(indices)
        src = masks[batch_idx, query_idx]  # (M, h, w)
        height = max(int(t["masks"].shape[-2]) for t in targets)
        width = max(int(t["masks"].shape[-1]) for t in targets)
        tgt = src.new_zeros(len(src), height, width)
        row = 0
        for t, (_, j) in zip(targets, indices):
            matched = t["masks"][j.to(t["masks"].device)]
            tgt[row:row + len(matched), :matched.shape[-2], :matched.shape[-1]] = matched.to(tgt)
            row += len(matched)
        src = F.interpolate(src[:, None], size=(height, width), mode="bilinear", align_corners=False)[:, 0]
        src, tgt = src.flatten(1), tgt.flatten(1)
        return {"loss_mask": focal_loss(src, tgt, num_boxes), "loss_dice": dice_loss(src, tgt, num_boxes)}

    @torch.no_grad()
    def cardinality_error(self, logits: Tensor, targets: Targets) -> Tensor:
        """Mean |predicted object count - target count| over images (a metric, not a loss)."""
        predicted = (logits.argmax(-1) != self.num_classes).sum(1).float()
        expected = torch.as_tensor([float(len(t["labels"])) for t in targets], device=logits.device)
        return F.l1_loss(predicted, expected)

    @torch.no_grad()
    def class_error(self, logits: Tensor, targets: Targets, indices: Indices) -> Tensor:
        """100 - top-1 accuracy (%) on matched queries (a metric); 0 when there are no targets."""
        batch_idx, query_idx = _matched(indices)
        labels = _matched_labels(targets, indices, logits.device)
        if labels.numel() == 0:
            return logits.new_zeros(())
        correct = (logits[batch_idx, query_idx].argmax(-1) == labels).float().mean()
        return 100.0 * (1.0 - correct)

    def _check_labels(self, targets: Targets) -> None:
        for i, t in enumerate(targets):
            labels = t["labels"]
            if labels.numel() and (labels.min() < 0 or labels.max() >= self.num_classes):
                raise ConfigError(f"target labels of image {i} in the batch are {labels.tolist()}, but they must lie "
                                 f"in [0, num_classes) = [0, {self.num_classes}); set model.num_classes to the "
                                 f"largest category id + 1")

    @staticmethod
    def _num_boxes(targets: Targets, device: torch.device) -> float:
        """Target boxes per process: the batch's count averaged over all processes, at least 1."""
        count = torch.tensor(float(sum(len(t["labels"]) for t in targets)), device=device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(count)
            count = count / dist.get_world_size()
        return count.clamp(min=1).item()


def _matched(indices: Indices) -> Tuple[Tensor, Tensor]:
    """(image index, query index) of every matched prediction, concatenated over the batch."""
    batch_idx = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)])
    query_idx = torch.cat([src for src, _ in indices])
    return batch_idx, query_idx


def _matched_labels(targets: Targets, indices: Indices, device: torch.device) -> Tensor:
    return torch.cat([t["labels"][j.to(t["labels"].device)] for t, (_, j) in zip(targets, indices)]).to(
        device, torch.int64)
