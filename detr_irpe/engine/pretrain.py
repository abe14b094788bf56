"""Backbone pretraining on image-level labels, for a backbone that has no ImageNet weights.

DETR starts from an ImageNet-pretrained ResNet; trained from scratch, its CNN gets almost no
signal through the decoder and the detector sits for thousands of iterations predicting the
same boxes for every image. The ``tiny`` CNN of the CPU demo has no ImageNet weights, so it is
pretrained here on the detection data itself: multi-label classification of which categories
each training image contains (a masked global average pool and a linear layer on the feature
map, binary cross-entropy), with the training split's usual augmentations. The saved state dict
is what ``model.backbone_weights`` takes.

    from detr_irpe.engine.pretrain import pretrain_backbone
    result = pretrain_backbone(cfg, "outputs/backbone.pth")  # cfg.train.pretrain_{iterations,batch_size,lr}
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import Config, ConfigError
from ..data import build_dataloader, build_dataset, set_epoch
from ..files import OutputExistsError, check_writable, refuse_existing
from ..models.backbone import TinyBackbone, build_backbone
from . import distributed as du
from .run_folder import prepare_run_folder
from .state import atomic_save

PRETRAINED_FILE = "backbone_pretrained.pth"  # in the run's folder, when train.pretrain_iterations asks for it
TARGETS = {"image": "which categories each image holds", "cells": "which categories cover each feature cell"}


@dataclass
class PretrainResult:
    """What :func:`pretrain_backbone` did: where the weights went and how the loss moved."""

    path: str
    iterations: int
    seconds: float
    first_loss: float  # mean binary cross-entropy of the first 20 iterations
    last_loss: float  # and of the last 20


class ImageLabelClassifier(nn.Module):
    """Backbone -> masked global average pool -> linear: one logit per category id."""

    def __init__(self, backbone: nn.Module, num_classes: int):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.num_channels, num_classes)

    def forward(self, images: Tensor, masks: Tensor) -> Tensor:
        """images ``(B, 3, H, W)``, masks ``(B, H, W)`` (True = padding) -> logits ``(B, num_classes)``."""
        features, mask = self.backbone(images, masks)
        keep = (~mask).unsqueeze(1).to(features.dtype)  # (B, 1, h, w)
        pooled = (features * keep).sum((2, 3)) / keep.sum((2, 3)).clamp(min=1.0)
        return self.head(pooled)


class CellLabelClassifier(nn.Module):
    """Backbone -> 1x1 convolution: one logit per category id and feature cell."""

    def __init__(self, backbone: nn.Module, num_classes: int):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Conv2d(backbone.num_channels, num_classes, kernel_size=1)

    def forward(self, images: Tensor, masks: Tensor) -> Tuple[Tensor, Tensor]:
        """images ``(B, 3, H, W)``, masks ``(B, H, W)`` -> logits ``(B, num_classes, h, w)`` and the
        feature mask ``(B, h, w)`` (True = padding)."""
        features, mask = self.backbone(images, masks)
        return self.head(features), mask


def cell_labels(targets: List[dict], num_classes: int, mask: Tensor) -> Tensor:
    """``(B, num_classes, h, w)`` multi-hot: 1 where the centre of a feature cell lies inside a box
    of that category id. Boxes are normalised ``(cx, cy, w, h)`` of each image's unpadded part,
    which covers the unpadded cells of ``mask`` ``(B, h, w)``."""
    B, h, w = mask.shape
    labels = torch.zeros(B, num_classes, h, w)
    for b, target in enumerate(targets):
        rows, cols = int((~mask[b]).any(1).sum()), int((~mask[b]).any(0).sum())
        if not len(target["labels"]) or not rows or not cols:
            continue
        y = (torch.arange(rows) + 0.5) / rows  # cell centres, normalised
        x = (torch.arange(cols) + 0.5) / cols
        cx, cy, bw, bh = target["boxes"].float().cpu().unbind(-1)
        inside_y = (y[None, :] - cy[:, None]).abs() <= bh[:, None] / 2  # (N, rows)
        inside_x = (x[None, :] - cx[:, None]).abs() <= bw[:, None] / 2  # (N, cols)
        inside = (inside_y[:, :, None] & inside_x[:, None, :]).float()  # (N, rows, cols)
        per_class = torch.zeros(num_classes, rows, cols).index_add_(0, target["labels"].cpu(), inside)
        labels[b, :, :rows, :cols] = (per_class > 0).float()
    return labels


def image_labels(targets: List[dict], num_classes: int) -> Tensor:
    """``(B, num_classes)`` multi-hot: 1 where the image has at least one box of that category id."""
    labels = torch.zeros(len(targets), num_classes)
    for row, target in enumerate(targets):
        labels[row, target["labels"]] = 1.0
    return labels


def pretrain_backbone(cfg: Config, out_path: str, seconds: Optional[float] = None,
                      quiet: bool = False, overwrite: bool = False) -> PretrainResult:
    """Pretrain ``cfg.model``'s (tiny) backbone on the image-level labels of ``cfg.data``'s
    training split for ``cfg.train.pretrain_iterations`` steps (batch ``cfg.train.pretrain_batch_size``,
    AdamW at ``cfg.train.pretrain_lr``), or until ``seconds`` of wall time have passed if that comes
    first, then save its state dict to ``out_path`` (an existing file only with ``overwrite``)."""
    iterations, batch_size, lr = cfg.train.pretrain_iterations, cfg.train.pretrain_batch_size, cfg.train.pretrain_lr
    if iterations <= 0:
        raise ConfigError("train.pretrain_iterations must be > 0 to pretrain the backbone")
    if cfg.model.backbone != "tiny":
        raise ConfigError(f"backbone pretraining is for the tiny backbone (no ImageNet weights); "
                          f"{cfg.model.backbone!r} starts from backbone_weights=imagenet instead")
    device = du.init_distributed(cfg.train.device)
    du.on_main_process(_check_output, Path(out_path), overwrite)
    torch.manual_seed(cfg.train.seed)
    train_set = build_dataset(cfg.data, "train")
    num_classes = cfg.model.num_classes or train_set.num_classes
    backbone = build_backbone("tiny", cfg.model.backbone_weights, train_backbone=True)
    dense = cfg.train.pretrain_target == "cells"
    model = (CellLabelClassifier if dense else ImageLabelClassifier)(backbone, num_classes).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=cfg.train.weight_decay)
    if du.is_distributed():  # one set of weights: gradients averaged over the processes
        ids = [device.index] if device.type == "cuda" else None
        model = nn.parallel.DistributedDataParallel(model, device_ids=ids)
    loader = build_dataloader(train_set, min(batch_size, len(train_set)), train=True,
                              num_workers=cfg.data.num_workers, seed=cfg.train.seed + 2)

    start, losses, epoch = time.time(), [], 0
    while True:
        set_epoch(loader, epoch)
        for images, masks, targets in loader:
            if dense:
                logits, mask = model(images.to(device), masks.to(device))
                keep = (~mask).unsqueeze(1).expand_as(logits)
                loss = F.binary_cross_entropy_with_logits(logits[keep], cell_labels(targets, num_classes, mask.cpu())
                                                          .to(device)[keep])
            else:
                logits = model(images.to(device), masks.to(device))
                loss = F.binary_cross_entropy_with_logits(logits, image_labels(targets, num_classes).to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            if not quiet and len(losses) % 100 == 0:
                print(f"[pretrain] iteration {len(losses)}: loss {sum(losses[-100:]) / 100:.4f} "
                      f"({time.time() - start:.0f}s)", flush=True)
            out_of_time = seconds is not None and time.time() - start >= seconds
            if len(losses) >= iterations or du.any_process(out_of_time, device):
                return _save(backbone, out_path, losses, time.time() - start)
        epoch += 1


def _check_output(out_path: Path, overwrite: bool) -> None:
    """Before any work: ``out_path`` may be written (and replaced only with ``overwrite``)."""
    if out_path.is_dir():
        raise OutputExistsError(f"--out {out_path} is a folder: name the file to write, e.g. {out_path / 'backbone.pth'}")
    if not overwrite:
        refuse_existing([out_path], "pass --overwrite to replace it, or choose another --out")
    check_writable(out_path.parent)


def _save(backbone: TinyBackbone, out_path: str, losses: List[float], seconds: float) -> PretrainResult:
    if du.is_main_process():
        atomic_save(backbone.state_dict(), out_path)
    du.barrier()
    head, tail = losses[:20], losses[-20:]
    return PretrainResult(str(out_path), len(losses), seconds, sum(head) / len(head), sum(tail) / len(tail))


def pretrain_for_run(cfg: Config, seconds: Optional[float] = None, max_iterations: Optional[int] = None,
                     quiet: bool = False) -> Optional[PretrainResult]:
    """The pretraining step of a training run: when ``cfg`` asks for it (``train.pretrain_iterations``
    > 0, a ``tiny`` backbone without weights), pretrain into ``<train.output_dir>/backbone_pretrained.pth``
    and point ``cfg.model.backbone_weights`` at it; else nothing (None).

    ``max_iterations`` caps ``train.pretrain_iterations`` (quick looks, tests). The run folder is
    checked first (:func:`~detr_irpe.engine.run_folder.prepare_run_folder`), so that a folder that
    holds another run is refused before any work.
    """
    t, m = cfg.train, cfg.model
    if t.pretrain_iterations <= 0 or m.backbone != "tiny" or m.backbone_weights != "none" or t.frozen_weights:
        return None  # (frozen_weights: the backbone comes from that checkpoint)
    if max_iterations is not None:
        t.pretrain_iterations = min(t.pretrain_iterations, max_iterations)
    du.init_distributed(t.device)
    du.on_main_process(prepare_run_folder, Path(t.output_dir))
    result = pretrain_backbone(cfg, str(Path(t.output_dir) / PRETRAINED_FILE), seconds=seconds, quiet=quiet,
                               overwrite=True)  # the folder holds no run: the file is this run's own
    m.backbone_weights = result.path
    if not quiet and du.is_main_process():
        print(f"backbone pretrained on {TARGETS[t.pretrain_target]}: {result.iterations} iterations in "
              f"{result.seconds:.0f}s, loss {result.first_loss:.3f} -> {result.last_loss:.3f}", flush=True)
    return result
