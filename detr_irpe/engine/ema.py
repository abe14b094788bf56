"""An exponential moving average of the weights (``train.ema``), as RT-DETR's ModelEMA ramps it."""
from __future__ import annotations

import copy
import math
from typing import List, Tuple

import torch
from torch import Tensor, nn


class ModelEMA:
    """A copy of ``model`` whose trained parameters follow the model's as an exponential moving
    average, one update per optimizer step.

    Update ``n`` (from 1) uses ``d = decay * (1 - exp(-n / warmup_steps))`` (``decay`` itself with
    ``warmup_steps=0``), RT-DETR's ramp, which keeps the average close to the model in the first
    few thousand steps: ``ema = d * ema + (1 - d) * model``, as one fused ``torch._foreach_lerp_``
    over the parameters that train. Everything else (buffers, such as the running statistics of
    batch norm and the frozen ones of ``FrozenBatchNorm2d``, and parameters that do not train) is
    copied, so it stays exactly the model's.

    ``module`` is the averaged model, in eval mode, without gradients; evaluate it as any model.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup_steps: int = 2000):
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = decay
        self.warmup_steps = warmup_steps
        self.updates = 0

    def decay_at(self, updates: int) -> float:
        """The decay of update number ``updates`` (from 1)."""
        if self.warmup_steps == 0:
            return self.decay
        return self.decay * (1.0 - math.exp(-updates / self.warmup_steps))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the average towards ``model`` (the model this one copied; not a DDP wrapper)."""
        self.updates += 1
        averaged, copied = self._pairs(model)
        if averaged[0]:
            torch._foreach_lerp_(averaged[0], averaged[1], 1.0 - self.decay_at(self.updates))
        if copied[0]:
            torch._foreach_copy_(copied[0], copied[1])

    def _pairs(self, model: nn.Module) -> Tuple[Tuple[List[Tensor], List[Tensor]], Tuple[List[Tensor], List[Tensor]]]:
        """``(ours, theirs)`` of the parameters that train, and of everything else."""
        averaged: Tuple[List[Tensor], List[Tensor]] = ([], [])
        copied: Tuple[List[Tensor], List[Tensor]] = ([], [])
        for mine, theirs in zip(self.module.parameters(), model.parameters()):
            target = averaged if theirs.requires_grad else copied
            target[0].append(mine)
            target[1].append(theirs.detach())
        for mine, theirs in zip(self.module.buffers(), model.buffers()):
            copied[0].append(mine)
            copied[1].append(theirs)
        return averaged, copied

    def state(self) -> dict:
        """What a checkpoint stores beside the averaged weights (its ``model``)."""
        return {"updates": self.updates, "decay": self.decay, "warmup_steps": self.warmup_steps}
