"""The demo end to end on a few images and iterations: every file it promises is written."""
import itertools
import json
import time
from pathlib import Path

import pytest

from detr_irpe.apps.demo import DemoSettings, build_demo_config, cap_schedule, run_demo


def test_the_shipped_schedule_is_fixed():
    settings = DemoSettings()
    cfg = build_demo_config(settings)
    assert cfg.train.pretrain_iterations == 300
    assert cap_schedule(cfg, settings.num_train // cfg.train.batch_size, settings.max_iterations) == 3000


@pytest.mark.filterwarnings("ignore:Creating legend")  # matplotlib times itself on the fake clock
def test_demo_smoke(tmp_path, monkeypatch):
    # a clock on which every reading is a minute later: a schedule planned from timings would shrink
    for name in ("time", "perf_counter", "monotonic"):
        ticks = itertools.count(start=1e9, step=60.0)
        monkeypatch.setattr(time, name, lambda ticks=ticks: next(ticks))
    settings = DemoSettings(
        output_dir=str(tmp_path / "run"), data_root=str(tmp_path / "data"),
        num_train=16, num_val=4, image_size=64, num_pictures=2, max_iterations=3, max_pretrain_iterations=4, quiet=True,
        overrides=["train.batch_size=4", "train.device=cpu", "model.hidden_dim=32", "model.dim_feedforward=64",
                   "model.enc_layers=1", "model.dec_layers=1", "train.warmup_iters=2"],
    )
    summary = run_demo(settings)
    out = tmp_path / "run"
    for name in ("checkpoint.pth", "metrics.json", "log.jsonl", "config.yaml", "demo_summary.json"):
        assert (out / name).is_file(), name
    assert summary["iterations"] == 3
    pretrained = summary["backbone_pretraining"]
    assert pretrained["iterations"] == 4 and Path(pretrained["path"]) == out / "backbone_pretrained.pth"
    assert f"backbone_weights: {pretrained['path']}" in (out / "config.yaml").read_text()
    assert set(json.loads((out / "metrics.json").read_text())) >= {"AP", "AP50"}
    assert json.loads((out / "demo_summary.json").read_text())["paths"]["checkpoint"] == str(out / "checkpoint.pth")
    pictures = summary["paths"]["pictures"]
    assert len(pictures["boxes"]) == 2
    assert pictures["attention"] and pictures["rpe_tables"] and pictures["training_curves"]
    for files in pictures.values():
        for f in files:
            assert f.endswith(".png") and Path(f).is_file(), f

    # run again: the earlier run stays as it was, this one goes to a new folder
    first = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    again = run_demo(settings)
    assert again["paths"]["output_dir"] == str(tmp_path / "run-2") and (tmp_path / "run-2" / "checkpoint.pth").is_file()
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == first


def test_a_cap_that_cuts_the_schedule_says_so(tmp_path, capsys, monkeypatch):
    # a clock on which every reading is a second later: the 0.6 s cap is spent after one iteration
    # of pretraining and one of training, on any machine
    for name in ("time", "perf_counter", "monotonic"):
        ticks = itertools.count(start=1e9, step=1.0)
        monkeypatch.setattr(time, name, lambda ticks=ticks: next(ticks))
    settings = DemoSettings(
        output_dir=str(tmp_path / "run"), data_root=str(tmp_path / "data"), budget_minutes=0.01, num_train=16,
        num_val=4, image_size=64, pictures=False,
        overrides=["train.batch_size=4", "train.device=cpu", "model.hidden_dim=32", "model.dim_feedforward=64",
                   "model.enc_layers=1", "model.dec_layers=1", "train.epochs=50", "train.pretrain_iterations=5000"],
    )
    summary = run_demo(settings)
    out = capsys.readouterr().out
    assert summary["cut_short"] and summary["iterations"] < summary["planned_iterations"] == 200
    assert summary["pretrain_iterations"] < 5000
    assert f"stopped at iteration {summary['iterations']} of 200" in out and "the AP below is not the demo's" in out


def _lrs(cfg, iters_per_epoch, steps):
    import torch

    from detr_irpe.engine.optim import build_scheduler

    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    sched, per_iteration = build_scheduler(opt, cfg, iters_per_epoch)
    lrs = []
    for _ in range(steps):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs, per_iteration, sched


def test_default_schedule_is_detr_step_lr():
    import torch

    from detr_irpe.config import TrainConfig

    _, per_iteration, sched = _lrs(TrainConfig(lr=1.0, lr_drop=2, epochs=4), 10, 1)
    assert not per_iteration and isinstance(sched, torch.optim.lr_scheduler.StepLR)


def test_cosine_schedule_with_warmup():
    import math

    from detr_irpe.config import TrainConfig

    cfg = TrainConfig(lr=1.0, epochs=2, lr_schedule="cosine", warmup_iters=4)
    lrs, per_iteration, _ = _lrs(cfg, 10, 20)
    assert per_iteration
    cosine = [0.5 * (1 + math.cos(math.pi * i / 20)) for i in range(20)]
    assert all(math.isclose(lrs[i], (i + 1) / 4 * cosine[i]) for i in range(4))  # linear warmup
    assert all(math.isclose(lrs[i], cosine[i]) for i in range(4, 20))
    assert math.isclose(lrs[10], 0.5, abs_tol=1e-9)  # half way through the 20 iterations
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:])) and lrs[-1] < 0.01


def test_step_schedule_with_warmup_drops_at_lr_drop_epoch():
    from detr_irpe.config import TrainConfig

    lrs, per_iteration, _ = _lrs(TrainConfig(lr=1.0, epochs=3, lr_drop=2, warmup_iters=2), 5, 15)
    assert per_iteration
    assert lrs[:3] == [0.5, 1.0, 1.0] and lrs[9] == 1.0 and abs(lrs[10] - 0.1) < 1e-12
