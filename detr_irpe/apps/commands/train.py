"""detr-irpe train: train DETR(-iRPE), or continue a run with --resume."""
from __future__ import annotations

import sys

from ...config import load_config
from ...data.check import check_config_data
from ...engine.resume import resume_training
from ...engine.train import train
from . import options


def add_arguments(p) -> None:
    p.add_argument("--config", help="YAML config: a path or a shipped name such as detr_r50 (see configs/)")
    p.add_argument("--resume", help="checkpoint.pth of a run to continue, in its folder, with its config "
                                    "(and --config / overrides on top)")
    p.add_argument("--check-data", action="store_true",
                   help="check the train and val datasets (like check-data; with model.masks, the segmentations "
                        "too) and stop without training")
    options.overrides(p)


def run(args) -> int:
    if args.resume and not args.check_data:
        resume_training(args.resume, args.config, args.overrides)
        return 0
    cfg = load_config(args.config, args.overrides)
    if args.check_data:
        return check_config_data(cfg.data, progress=sys.stderr.isatty(), masks=cfg.model.masks)
    train(cfg)
    return 0
