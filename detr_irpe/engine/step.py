"""One training iteration, shared by the training loop, the demo's timing, the benchmarks and the tests."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from ..errors import DetrIrpeError

Batch = Tuple[Tensor, Tensor, List[Dict[str, Tensor]]]  # images (B, 3, H, W), masks (B, H, W), targets


class NonFiniteLossError(DetrIrpeError, FloatingPointError):
    """The loss became NaN or infinite; names the iteration and the offending terms."""


@dataclass
class StepResult:
    """What :func:`train_step` did: the weighted loss (None if the batch was skipped), every loss
    term (detached scalars), and the reason a non-finite batch was skipped."""

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


def train_step(model: nn.Module, criterion: nn.Module, optimizer: torch.optim.Optimizer, batch: Batch, *,
               amp: str = "none", scaler: Optional[torch.amp.GradScaler] = None, clip_max_norm: float = 0.0,
               skip_nonfinite: bool = False, where: str = "this iteration") -> StepResult:
    """Forward (under ``amp`` autocast), loss, non-finite check, backward (through ``scaler``, for
    fp16), gradient clipping to ``clip_max_norm`` (0: none) and one optimizer step.

    ``batch`` is on the model's device. A non-finite loss raises :class:`NonFiniteLossError`
    naming ``where`` and the offending terms, or with ``skip_nonfinite`` leaves the weights alone
    and returns the reason in ``skipped``.
    """
    images, masks, targets = batch
    with autocast_context(images.device, amp):
        outputs = model(images, masks)
    loss_dict = criterion(outputs, targets)
    loss = criterion.weighted_loss(loss_dict)
    losses = {k: v.detach() for k, v in loss_dict.items() if v.dim() == 0}
    problem = check_finite(loss, loss_dict, criterion.weight_dict, where)
    optimizer.zero_grad(set_to_none=True)
    if problem is not None:
        if not skip_nonfinite:
            raise NonFiniteLossError(problem)
        return StepResult(None, losses, problem)
    scaler = scaler if scaler is not None else torch.amp.GradScaler(images.device.type, enabled=False)
    scaler.scale(loss).backward()
    if clip_max_norm > 0:
        scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_(model.parameters(), clip_max_norm)
    scaler.step(optimizer)
    scaler.update()
    return StepResult(loss.item(), losses)
