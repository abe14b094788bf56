"""The model learns real COCO photographs: the loss on a few images falls within a few dozen steps.

The long version (train to a high AP on these images) is ``benchmarks/overfit_coco.py``.
"""
import torch

from detr_irpe.config import load_config
from detr_irpe.data import build_train_val_datasets, collate_fn
from detr_irpe.engine.step import train_step
from detr_irpe.engine.optim import build_optimizer
from detr_irpe.models import build_detr
from helpers import COCO, REPO

ITERATIONS = 60


def test_loss_falls_on_real_coco_images():
    torch.manual_seed(0)
    cfg = load_config(REPO / "configs" / "overfit_coco.yaml", [
        f"data.root={COCO}", "data.train_scales=[128]", "data.max_size=128",
        "model.hidden_dim=32", "model.nheads=2", "model.enc_layers=1", "model.dim_feedforward=64",
        "model.num_queries=16", "train.lr=1e-3", "train.lr_backbone=1e-3"])
    train_set, _ = build_train_val_datasets(cfg)
    with_objects = [i for i in range(len(train_set)) if len(train_set[i][1]["labels"]) > 0][:4]
    images, masks, targets = collate_fn([train_set[i] for i in with_objects])
    assert len(targets) == 4 and all(len(t["labels"]) for t in targets)

    model, criterion, _ = build_detr(cfg.model)
    model.train()
    optimizer = build_optimizer(model, cfg.train)
    losses = [train_step(model, criterion, optimizer, (images, masks, targets), clip_max_norm=cfg.train.clip_max_norm).loss
              for _ in range(ITERATIONS)]
    start, end = losses[0], sum(losses[-5:]) / 5
    assert end < 0.5 * start, f"loss {start:.2f} -> {end:.2f} after {ITERATIONS} iterations: {losses}"
