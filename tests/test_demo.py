"""The demo end to end on a few images and iterations: every file it promises is written."""
import json
from pathlib import Path

from detr_irpe.demo import DemoSettings, run_demo


def test_demo_smoke(tmp_path):
    settings = DemoSettings(
        output_dir=str(tmp_path / "run"), data_root=str(tmp_path / "data"), budget_minutes=2.0,
        num_train=16, num_val=4, image_size=64, num_pictures=2, max_iterations=3, quiet=True,
        overrides=["train.batch_size=4", "train.device=cpu", "model.hidden_dim=32", "model.dim_feedforward=64",
                   "model.enc_layers=1", "model.dec_layers=1", "train.warmup_iters=2"],
    )
    summary = run_demo(settings)
    out = tmp_path / "run"
    for name in ("checkpoint.pth", "metrics.json", "log.jsonl", "config.yaml", "demo_summary.json"):
        assert (out / name).is_file(), name
    assert summary["iterations"] == 3
    assert set(json.loads((out / "metrics.json").read_text())) >= {"AP", "AP50"}
    assert json.loads((out / "demo_summary.json").read_text())["paths"]["checkpoint"] == str(out / "checkpoint.pth")
    pictures = summary["paths"]["pictures"]
    assert len(pictures["boxes"]) == 2
    assert pictures["attention"] and pictures["rpe_tables"] and pictures["training_curves"]
    for files in pictures.values():
        for f in files:
            assert f.endswith(".png") and Path(f).is_file(), f
