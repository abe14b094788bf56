#!/usr/bin/env python
"""Pretrain the tiny backbone on which categories each training image holds (no ImageNet weights
exist for it), then train DETR from the result:

    python tools/pretrain_backbone.py --config configs/demo.yaml --minutes 2 --out outputs/tiny_backbone.pth
    python tools/train.py --config configs/demo.yaml model.backbone_weights=outputs/tiny_backbone.pth

The data.* keys of the config (and overrides) name the training split; `make demo` does this
step for you.
"""
import argparse
import sys

from detr_irpe.config import ConfigError, load_config
from detr_irpe.data import AnnotationError, DataItemError, DataLoaderWorkerError, DatasetNotFoundError, ImageDecodeError
from detr_irpe.engine.pretrain import pretrain_backbone

CLEAR_ERRORS = (ConfigError, ValueError, FileNotFoundError, AnnotationError, DatasetNotFoundError, ImageDecodeError,
                DataItemError, DataLoaderWorkerError)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config with model.backbone=tiny and the data.* keys")
    parser.add_argument("--out", required=True, help="where the backbone state dict is written")
    parser.add_argument("--minutes", type=float, help="wall-clock budget (default 2 unless --iterations)")
    parser.add_argument("--iterations", type=int, help="number of iterations")
    parser.add_argument("--batch-size", type=int, default=32, help="default %(default)s")
    parser.add_argument("--lr", type=float, default=2e-3, help="AdamW learning rate (default %(default)s)")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. data.root=/data/shapes")
    args = parser.parse_args(argv)
    minutes = 2.0 if args.minutes is None and args.iterations is None else args.minutes
    try:
        cfg = load_config(args.config, args.overrides)
        result = pretrain_backbone(cfg, args.out, seconds=None if minutes is None else 60.0 * minutes,
                                   iterations=args.iterations, batch_size=args.batch_size, lr=args.lr)
    except CLEAR_ERRORS as e:
        sys.exit(f"error: {e}")
    print(f"{result.iterations} iterations in {result.seconds:.0f}s, loss {result.first_loss:.4f} -> "
          f"{result.last_loss:.4f}; backbone written to {result.path}\n"
          f"train with: model.backbone_weights={result.path}")


if __name__ == "__main__":
    main()
