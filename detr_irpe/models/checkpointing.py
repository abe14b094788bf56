"""Activation checkpointing: parts of DETR that recompute their activations in backward instead of
keeping them (``train.activation_checkpointing``), with ``torch.utils.checkpoint``."""
from __future__ import annotations

import contextlib
from typing import Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import ACTIVATION_CHECKPOINTING as PARTS


def set_activation_checkpointing(model: nn.Module, parts: Sequence[str]) -> None:
    """Checkpoint ``parts`` of a DETR (or DETRsegm) in training: the backbone block by block (each
    ResNet bottleneck, each stage of the tiny CNN), the encoder and the decoder layer by layer.
    The others are switched off. Evaluation, ``torch.no_grad()`` and export run as without."""
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        raise ValueError(f"activation checkpointing of {unknown}: the parts are {', '.join(PARTS)}")
    model.backbone[0].checkpointing = "backbone" in parts
    model.transformer.encoder.checkpointing = "encoder" in parts
    model.transformer.decoder.checkpointing = "decoder" in parts


def maybe_checkpointed(enabled: bool, module: nn.Module, *args):
    """``module(*args)``, checkpointed when ``enabled``, the module trains and gradients are being
    recorded (see :func:`checkpointed`)."""
    if enabled and module.training and torch.is_grad_enabled():
        return checkpointed(module, *args)
    return module(*args)


def checkpointed(module: nn.Module, *args):
    """``module(*args)``, keeping only its inputs for backward, which runs it again first.

    Non-reentrant (``use_reentrant=False``), RNG state preserved: the recompute draws the dropout
    masks of the first pass again, those of the iRPE kernels included (they take their seeds from
    torch's generator), and runs under the same autocast. Batch-norm running statistics are
    updated once, by the first pass (the recompute puts them back).
    """
    calls = 0

    def run(*inputs):
        nonlocal calls
        calls += 1
        if calls == 1:
            return module(*inputs)
        with _running_stats_kept(module):
            return module(*inputs)

    return checkpoint(run, *args, use_reentrant=False, preserve_rng_state=True)


@contextlib.contextmanager
def _running_stats_kept(module: nn.Module):
    norms = [m for m in module.modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats]
    saved = [[b.clone() for b in (m.running_mean, m.running_var, m.num_batches_tracked)] for m in norms]
    try:
        yield
    finally:
        with torch.no_grad():
            for m, values in zip(norms, saved):
                for buffer, value in zip((m.running_mean, m.running_var, m.num_batches_tracked), values):
                    buffer.copy_(value)
