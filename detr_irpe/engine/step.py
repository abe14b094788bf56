"""One optimizer step (its micro-batches, clipping, the step, the EMA), shared by the training loop, the demo's
timing, the benchmarks and the tests."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from ..errors import DetrIrpeError
from ..models.criterion import LossNormalizers
from . import distributed as du
from .ema import ModelEMA

Batch = Tuple[Tensor, Tensor, List[Dict[str, Tensor]]]  # images (B, 3, H, W), masks (B, H, W), targets


class NonFiniteLossError(DetrIrpeError, FloatingPointError):
    """The loss became NaN or infinite; names the iteration and the offending terms."""


@dataclass
class StepResult:
    """What :func:`train_step` did: the weighted loss (None if the step was skipped), every loss
    term and metric (detached scalars), and the reason a non-finite step was skipped."""

    loss: Optional[float]
    losses: Dict[str, Tensor]
    skipped: Optional[str] = None


def autocast_context(device: torch.device, amp: str):
    """``torch.autocast`` for ``amp`` in ``bf16`` / ``fp16``; a no-op for ``none``."""
    if amp == "none":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def to_device(images: Tensor, masks: Tensor, targets: List[dict], device) -> Batch:
    """A collated batch on ``device`` (tensors inside the target dicts included)."""
    images = images.to(device, non_blocking=True)
    masks = masks.to(device, non_blocking=True)
    targets = [{k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in t.items()}
               for t in targets]
    return images, masks, targets


def check_finite(loss: Tensor, loss_dict: Dict[str, Tensor], weight_dict, where: str) -> Optional[str]:
    """None if the loss is finite, else a message naming the offending terms."""
    if torch.isfinite(loss):
        return None
    bad = [f"{k}={float(v.detach()):.4g}" for k, v in loss_dict.items() if k in weight_dict and not torch.isfinite(v)]
    return (f"non-finite loss ({float(loss.detach())}) at {where}; offending terms: {', '.join(bad) or 'the weighted sum'}. "
            f"Lower train.lr, check the data (tools/check_data.py) or set train.skip_nonfinite=true to skip such batches")


def step_normalizers(criterion: nn.Module, model: nn.Module, batches: Sequence[Batch],
                     normalization: str = "official") -> Optional[LossNormalizers]:
    """What the losses of one optimizer step over ``batches`` (this process's micro-batches) are
    divided by, from their targets, summed over processes (one all-reduce); None where each
    criterion call's own are the same thing (one batch in one process, or ``official`` with one
    batch: DETR's computation, unchanged).

    ``global``: the counts of the whole step, every micro-batch of every process. DDP averages
    the gradients over the ``W`` processes, so each divides by ``count / W``: ``W`` processes x
    ``k`` micro-batches x ``B`` images equal one batch of ``W k B``, every loss.
    ``official``: DETR's under DDP. The box count is averaged over processes (at least 1), the
    cross-entropy a weighted mean over this process's own micro-batches.
    """
    world = du.get_world_size()
    if len(batches) == 1 and (world == 1 or normalization == "official"):
        return None
    detr = _unwrap(model)
    groups = detr.query_groups if detr.training else 1
    counts = [criterion.batch_counts(targets, detr.num_queries, groups) for _, _, targets in batches]
    boxes, weight = (sum(c[i] for c in counts) for i in range(2))
    if world == 1:
        total_boxes, total_weight = boxes, weight
    else:
        device = next(detr.parameters()).device
        summed = torch.tensor([boxes, weight], dtype=torch.float64, device=device)
        torch.distributed.all_reduce(summed)
        total_boxes, total_weight = summed.tolist()
    if normalization == "official":
        return LossNormalizers(num_boxes=max(total_boxes / world, 1.0), class_weight=weight)
    return LossNormalizers(num_boxes=max(total_boxes, 1.0) / world, class_weight=total_weight / world)


def train_step(model: nn.Module, criterion: nn.Module, optimizer: torch.optim.Optimizer,
               batch: Union[Batch, Sequence[Batch]], *, amp: str = "none",
               scaler: Optional[torch.amp.GradScaler] = None, clip_max_norm: float = 0.0,
               skip_nonfinite: bool = False, where: str = "this iteration", normalization: str = "official",
               batched_backbone: bool = True, ema: Optional[ModelEMA] = None,
               device: Optional[torch.device] = None) -> StepResult:
    """One optimizer step: for each micro-batch forward (under ``amp`` autocast), loss, non-finite
    check and backward (through ``scaler``, for fp16); then gradient clipping to ``clip_max_norm``
    (0: none), the optimizer step and the ``ema`` update.

    ``batch`` is one batch, or a list of micro-batches that together make the step's batch
    (gradient accumulation): their losses are divided by the counts of the whole step
    (:func:`step_normalizers` with ``normalization``), so the step equals one over all their
    images. Under DDP only the last micro-batch's backward synchronises the gradients. Batches are
    on the model's device, or moved to ``device`` one at a time before their forward.
    ``batched_backbone=False`` runs the CNN on each image unpadded (see ``DETR.forward``).

    A non-finite loss raises :class:`NonFiniteLossError` naming ``where`` and the offending terms,
    or with ``skip_nonfinite`` leaves the weights alone and returns the reason in ``skipped``.
    The result holds the step's loss and loss terms (summed over micro-batches) and metrics
    (averaged over them).
    """
    batches = [batch] if torch.is_tensor(batch[0]) else list(batch)
    normalizers = step_normalizers(criterion, model, batches, normalization)
    forward_options = {} if batched_backbone else {"batched_backbone": False}
    scaler = scaler if scaler is not None else torch.amp.GradScaler(_device_of(batches[0], device).type, enabled=False)
    total, parts = 0.0, []
    for i, micro in enumerate(batches):
        images, masks, targets = micro if device is None else to_device(*micro, device)
        last = i == len(batches) - 1
        here = where if len(batches) == 1 else f"{where}, micro-batch {i} of {len(batches)}"
        with contextlib.nullcontext() if last else _no_sync(model):
            with autocast_context(images.device, amp):
                outputs = model(images, masks, **forward_options)
            loss_dict = criterion(outputs, targets) if normalizers is None else criterion(outputs, targets, normalizers)
            loss = criterion.weighted_loss(loss_dict)
            parts.append({k: v.detach() for k, v in loss_dict.items() if v.dim() == 0})
            problem = check_finite(loss, loss_dict, criterion.weight_dict, here)
            if i == 0:
                optimizer.zero_grad(set_to_none=True)
            if problem is not None:
                optimizer.zero_grad(set_to_none=True)
                if not skip_nonfinite:
                    raise NonFiniteLossError(problem)
                return StepResult(None, _combine(parts), problem)
            scaler.scale(loss).backward()
        total += loss.item()
    if clip_max_norm > 0:
        scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_(model.parameters(), clip_max_norm)
    scaler.step(optimizer)
    scaler.update()
    if ema is not None:
        ema.update(_unwrap(model))
    return StepResult(total, _combine(parts))


def _device_of(batch: Batch, device: Optional[torch.device]) -> torch.device:
    return torch.device(device) if device is not None else batch[0].device


def _unwrap(model: nn.Module) -> nn.Module:
    """The model inside DDP's wrapper (the model itself when not wrapped)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _no_sync(model: nn.Module):
    """DDP's ``no_sync()`` (backward keeps the gradients local), a no-op for a plain module."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return model.no_sync()
    return contextlib.nullcontext()


def _combine(parts: List[Dict[str, Tensor]]) -> Dict[str, Tensor]:
    """One step's terms from its micro-batches': losses (``loss*``, shares of the step's) summed,
    metrics (class and cardinality errors) averaged."""
    if len(parts) == 1:
        return parts[0]
    return {k: sum(p[k] for p in parts) / (1 if k.startswith("loss") else len(parts)) for k in parts[0]}
