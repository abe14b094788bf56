"""Overfit a handful of real COCO images on CPU: the pipeline learns photographs, not only shapes.

Trains the small DETR-iRPE of ``configs/overfit_coco.yaml`` on the real COCO 2017 images copied
into ``tests/data/coco`` (train2017: six images, 35 objects) and evaluates COCO mAP on the same
images, for the config's epochs (2000, about 7.5 minutes on 2 CPU cores) or a wall-clock
budget, whichever ends first.

    python benchmarks/overfit_coco.py                       # at most 10 minutes
    python benchmarks/overfit_coco.py --minutes 3
    python benchmarks/overfit_coco.py model.rpe=null train.lr=2e-4

Prints AP / AP50, the iterations and the seconds, and writes them with the machine to
``<output_dir>/overfit_coco.json``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from machine import describe  # benchmarks/ is on sys.path when a script here runs
from detr_irpe.config import ConfigError, load_config
from detr_irpe.engine.train import Trainer

REPO = Path(__file__).resolve().parents[1]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "configs" / "overfit_coco.yaml"))
    parser.add_argument("--minutes", type=float, default=10.0, help="training budget, a cap on top of train.epochs (default %(default)s)")
    parser.add_argument("--eval-every", type=int, default=100, help="epochs between evaluations (default %(default)s)")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = parser.parse_args(argv)
    overrides = [f"data.root={REPO / 'tests' / 'data' / 'coco'}", f"train.max_minutes={args.minutes}",
                 f"train.eval_every={args.eval_every}"] + list(args.overrides)
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as e:
        sys.exit(f"error: {e}")

    start = time.time()
    trainer = Trainer(cfg, quiet=True)
    metrics = trainer.fit()
    seconds = time.time() - start
    result = {"AP": metrics.get("AP"), "AP50": metrics.get("AP50"), "AP75": metrics.get("AP75"),
              "iterations": trainer.global_step, "epochs": trainer.epoch, "seconds": round(seconds, 1),
              "command": " ".join(["python", "benchmarks/overfit_coco.py"] + (argv if argv is not None else sys.argv[1:])),
              "rpe": cfg.model.rpe, "machine": describe()}
    out = Path(cfg.train.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "overfit_coco.json").write_text(json.dumps(result, indent=2))
    print(f"overfit on {cfg.data.train_images} ({cfg.model.rpe or 'plain encoder'}): AP {result['AP']:.3f}  "
          f"AP50 {result['AP50']:.3f}  AP75 {result['AP75']:.3f} after {result['iterations']} iterations "
          f"in {seconds / 60:.1f} min  -> {out / 'overfit_coco.json'}")


if __name__ == "__main__":
    main()
