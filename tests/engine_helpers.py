"""Shared settings for the engine tests: a tiny DETR-iRPE on the real COCO images in tests/data."""
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COCO = REPO / "tests" / "data" / "coco"


def tiny_overrides(output_dir, **extra) -> list:
    """key=value overrides for a model that trains a few iterations in seconds on CPU."""
    values = {
        "data.root": str(COCO),
        "data.train_scales": "[96, 128]", "data.max_size": 160, "data.eval_size": 128,
        "data.crop_resize": "[96]", "data.crop_min": 64, "data.crop_max": 96, "data.num_workers": 0,
        "model.backbone": "tiny", "model.backbone_weights": "none", "model.hidden_dim": 32, "model.nheads": 2,
        "model.enc_layers": 1, "model.dec_layers": 2, "model.dim_feedforward": 64, "model.num_queries": 6,
        "model.rpe": "rpe-2.0-product-ctx-1-k", "model.num_classes": 91,
        "train.output_dir": str(output_dir), "train.epochs": 2, "train.batch_size": 2, "train.lr": 1e-3,
        "train.lr_drop": 1, "train.log_every": 1, "train.seed": 7, "train.deterministic": "true",
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def run_tool(script: str, *args, timeout: int = 300, extra_env=None) -> subprocess.CompletedProcess:
    """Run ``tools/<script>`` (or a module via ``-m``) the way a user does; fails with its output."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", **(extra_env or {}))
    cmd = [sys.executable] + (list(script) if isinstance(script, (list, tuple)) else [str(REPO / "tools" / script)])
    proc = subprocess.run(cmd + [str(a) for a in args], capture_output=True, text=True, timeout=timeout,
                          cwd=REPO, env=env)
    if proc.returncode != 0:
        raise AssertionError(f"{cmd} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc
