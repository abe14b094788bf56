"""Backbone pretraining on image-level labels: it learns, saves weights the tiny backbone loads,
and bad weight files are refused with a clear message."""
import pytest
import torch

from detr_irpe.config import load_config
from detr_irpe.engine.pretrain import ImageLabelClassifier, cell_labels, image_labels, pretrain_backbone
from detr_irpe.models import build_backbone, build_detr
from helpers import COCO, REPO, tiny_overrides, tool


def _cfg(tmp_path, **extra):
    return load_config(None, tiny_overrides(tmp_path / "run", **{"data.crop_resize": "[]", **extra}))


def test_image_labels_are_multi_hot():
    targets = [{"labels": torch.tensor([3, 1, 3])}, {"labels": torch.tensor([], dtype=torch.int64)}]
    assert image_labels(targets, 5).tolist() == [[0, 1, 0, 1, 0], [0, 0, 0, 0, 0]]


def test_cell_labels_mark_the_cells_whose_centres_lie_in_a_box():
    mask = torch.ones(2, 4, 6, dtype=torch.bool)
    mask[0, :4, :4] = False  # image 0: 4x4 cells, then padding; image 1: no cell at all
    mask[1, :2, :3] = False  # image 1: 2x3 cells
    targets = [{"labels": torch.tensor([2, 1]), "boxes": torch.tensor([[0.25, 0.25, 0.5, 0.5], [0.9, 0.9, 0.1, 0.1]])},
               {"labels": torch.tensor([], dtype=torch.int64), "boxes": torch.zeros(0, 4)}]
    labels = cell_labels(targets, 3, mask)
    expected = torch.zeros(2, 3, 4, 6)
    expected[0, 2, :2, :2] = 1  # centres 0.125, 0.375 inside [0, 0.5]
    expected[0, 1, 3, 3] = 1  # centre (0.875, 0.875) inside [0.85, 0.95]
    assert torch.equal(labels, expected)
    for y in range(4):  # brute force over cells for image 0
        for x in range(4):
            cy, cx = (y + 0.5) / 4, (x + 0.5) / 4
            inside = abs(cx - 0.25) <= 0.25 and abs(cy - 0.25) <= 0.25
            assert labels[0, 2, y, x] == float(inside)


def test_dense_pretraining_learns(tmp_path):
    cfg = _cfg(tmp_path, **{"train.pretrain_iterations": 30, "train.pretrain_batch_size": 4, "train.pretrain_lr": 3e-3,
                            "train.pretrain_target": "cells"})
    result = pretrain_backbone(cfg, str(tmp_path / "cells.pth"), quiet=True)
    assert result.iterations == 30 and result.last_loss < 0.7 * result.first_loss, result


def test_classifier_pools_only_unpadded_features():
    torch.manual_seed(0)
    model = ImageLabelClassifier(build_backbone("tiny"), 4).eval()
    image = torch.randn(1, 3, 64, 64)
    padded = torch.nn.functional.pad(image, (0, 64, 0, 64))
    mask = torch.ones(1, 128, 128, dtype=torch.bool)
    mask[:, :64, :64] = False
    alone = model(image, torch.zeros(1, 64, 64, dtype=torch.bool))
    # padding changes the convolutions at the border, not the pooling weights: close, not equal
    assert torch.allclose(model(padded, mask), alone, atol=0.5)
    assert not torch.allclose(model(padded, torch.zeros_like(mask)), model(padded, mask), atol=1e-4)


def test_pretraining_learns_and_its_weights_load(tmp_path):
    out = tmp_path / "backbone.pth"
    cfg = _cfg(tmp_path, **{"train.pretrain_iterations": 40, "train.pretrain_batch_size": 4, "train.pretrain_lr": 3e-3})
    result = pretrain_backbone(cfg, str(out), quiet=True)
    assert result.iterations == 40 and out.is_file()
    assert result.last_loss < 0.7 * result.first_loss, result
    state = torch.load(out, weights_only=True)
    backbone = build_backbone("tiny", str(out))
    assert all(torch.equal(backbone.state_dict()[k], v) for k, v in state.items())
    cfg = _cfg(tmp_path, **{"model.backbone_weights": str(out)})
    model, _, _ = build_detr(cfg.model)
    assert torch.equal(model.backbone[0].body.stage0.conv.weight, state["body.stage0.conv.weight"])


def test_pretrain_cli(tmp_path, capsys):
    out = tmp_path / "b.pth"
    assert tool("pretrain_backbone").main([
        "--config", str(REPO / "configs" / "demo.yaml"), "--out", str(out), "--iterations", "3", "--batch-size", "2",
        f"data.root={COCO}", "data.train_images=train2017", "data.train_annotations=annotations/instances_train2017.json",
        "model.num_classes=91"]) == 0
    assert out.is_file() and "model.backbone_weights=" in capsys.readouterr().out


def test_bad_backbone_weights_are_refused_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="tools/pretrain_backbone.py"):
        build_backbone("tiny", str(tmp_path / "missing.pth"))
    with pytest.raises(ValueError, match="no ImageNet weights"):
        build_backbone("tiny", "imagenet")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a torch file")
    with pytest.raises(RuntimeError, match="could not be read"):
        build_backbone("tiny", str(garbage))
    wrong = tmp_path / "resnet_like.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7)}, wrong)
    with pytest.raises(RuntimeError, match="not a state dict of the tiny backbone"):
        build_backbone("tiny", str(wrong))
    with pytest.raises(ValueError, match="for the tiny backbone"):
        pretrain_backbone(_cfg(tmp_path, **{"model.backbone": "resnet18", "train.pretrain_iterations": 1}), str(tmp_path / "x.pth"))
    with pytest.raises(ValueError, match="train.pretrain_iterations must be > 0"):
        pretrain_backbone(_cfg(tmp_path), str(tmp_path / "x.pth"))
