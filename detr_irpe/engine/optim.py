"""The optimizer and learning-rate schedule of DETR training."""
from __future__ import annotations

import math

import torch
from torch import nn


def build_optimizer(model: nn.Module, cfg) -> torch.optim.Optimizer:
    """AdamW with two groups: the backbone at ``lr_backbone`` and everything else at ``lr``."""
    backbone = [p for n, p in model.named_parameters() if "backbone" in n and p.requires_grad]
    rest = [p for n, p in model.named_parameters() if "backbone" not in n and p.requires_grad]
    groups = [{"params": rest, "lr": cfg.lr, "name": "transformer"}]
    if backbone:
        groups.append({"params": backbone, "lr": cfg.lr_backbone, "name": "backbone"})
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg, iters_per_epoch: int):
    """The learning-rate schedule of ``cfg`` (a ``TrainConfig``) and whether it steps every iteration.
    An iteration is an optimizer step (``train.accumulate`` micro-batches); ``iters_per_epoch``
    counts them.

    ``lr_schedule=step`` without warmup is DETR's ``StepLR`` (divide by 10 at epoch ``lr_drop``),
    stepped once per epoch. Warmup or ``lr_schedule=cosine`` give a per-iteration ``LambdaLR``:
    linear warmup over ``warmup_iters``, then the step drop at iteration ``lr_drop * iters_per_epoch``
    or a cosine decay to 0 over all ``epochs * iters_per_epoch`` iterations.
    """
    if cfg.lr_schedule == "step" and cfg.warmup_iters == 0:
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.lr_drop, gamma=0.1), False
    total = max(cfg.epochs * iters_per_epoch, 1)

    def factor(step: int) -> float:
        warm = min(1.0, (step + 1) / cfg.warmup_iters) if cfg.warmup_iters else 1.0
        if cfg.lr_schedule == "cosine":
            return warm * 0.5 * (1.0 + math.cos(math.pi * min(step / total, 1.0)))
        return warm * 0.1 ** (step // max(cfg.lr_drop * iters_per_epoch, 1))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor), True
