"""Loading checkpoints in the formats users have: ours, official DETR / iRPE-DETR (args Namespace)."""
import argparse

import pytest
import torch

from helpers import tiny_overrides
from detr_irpe.config import Config, load_config
from detr_irpe.engine.inference import config_for_checkpoint, load_detector
from detr_irpe.engine.train import Trainer
from detr_irpe.models import build_detr


def official_args(rpe=""):
    """The fields of DETR's main.py Namespace that describe the model (as stored in its checkpoints)."""
    return argparse.Namespace(backbone="resnet50", dilation=False, position_embedding="sine", hidden_dim=256,
                              nheads=8, enc_layers=6, dec_layers=6, dim_feedforward=2048, dropout=0.1,
                              pre_norm=False, num_queries=100, enc_rpe2d=rpe, lr=1e-4, lr_drop=100,
                              dataset_file="coco", aux_loss=True, masks=False)


@pytest.mark.parametrize("rpe", ["", "rpe-2.0-product-ctx-1-k"])
def test_official_format_checkpoint_loads_without_config(tmp_path, rpe):
    model, _, _ = build_detr(backbone_weights="none", rpe=rpe or None)
    path = tmp_path / "detr.pth"
    torch.save({"model": model.state_dict(), "optimizer": {}, "lr_scheduler": {}, "epoch": 149,
                "args": official_args(rpe)}, path)
    det = load_detector(str(path))
    assert det.config.model.rpe == (rpe or None) and det.config.model.num_classes == 91
    assert sum(p.numel() for p in det.model.parameters()) == (41_540_320 if rpe else 41_524_768)
    for k, v in model.state_dict().items():
        assert torch.equal(det.model.state_dict()[k], v)


def test_shapes_of_weights_decide_classes_and_queries():
    model, _, _ = build_detr(backbone="resnet18", backbone_weights="none", hidden_dim=32, nheads=2, enc_layers=1,
                             dec_layers=1, dim_feedforward=32, num_queries=7, num_classes=4)
    cfg = Config()
    cfg.model.backbone = "resnet18"
    ckpt = {"model": model.state_dict(), "config": cfg.to_dict()}
    got = config_for_checkpoint(ckpt)
    assert (got.model.num_classes, got.model.num_queries, got.model.backbone_weights) == (4, 7, "none")


def test_bf16_autocast_training_step(tmp_path):
    cfg = load_config(None, tiny_overrides(tmp_path, **{"train.epochs": 1, "train.amp": "bf16",
                                                        "train.max_iters_per_epoch": 2, "train.eval_every": 0}))
    trainer = Trainer(cfg, quiet=True)
    metrics = trainer.fit()
    assert trainer.global_step == 2
    assert "AP" in metrics
    assert all(torch.isfinite(v).all() for v in trainer.model.state_dict().values() if v.is_floating_point())
