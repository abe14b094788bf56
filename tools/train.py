#!/usr/bin/env python
"""Train DETR(-iRPE).

    python tools/train.py --config configs/detr_r50_irpe_product_ctx_k_9x9.yaml data.root=/data/coco
    torchrun --nproc_per_node 8 tools/train.py --config ... train.output_dir=outputs/irpe_9x9
    python tools/train.py --config ... --resume outputs/irpe_9x9/checkpoint.pth train.lr=5e-5
    python tools/train.py --config ... --check-data     # check the train and val data, then stop
"""
import argparse
import sys

from detr_irpe.config import ConfigError, load_config
from detr_irpe.data.errors import (AnnotationError, DataItemError, DataLoaderWorkerError, DatasetNotFoundError,
                                   ImageDecodeError)
from detr_irpe.engine.checkpoint import CheckpointError
from detr_irpe.engine.train import NonFiniteLossError, train

# errors that already say what is wrong and what to do: print them, no traceback
CLEAR_ERRORS = (ConfigError, AnnotationError, DatasetNotFoundError, ImageDecodeError, CheckpointError,
                NonFiniteLossError, DataItemError, DataLoaderWorkerError)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML config (see configs/)")
    parser.add_argument("--resume", help="checkpoint.pth of an interrupted run to continue")
    parser.add_argument("--check-data", action="store_true",
                        help="check the train and val datasets (tools/check_data.py) and stop without training")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.lr=2e-4 model.rpe=null")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        sys.exit(f"error: {e}")
    if args.check_data:
        from detr_irpe.data.check import check_config_data

        sys.exit(check_config_data(cfg.data, progress=sys.stderr.isatty()))
    try:
        train(cfg, resume=args.resume)
    except CLEAR_ERRORS as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
