#!/usr/bin/env python
"""Train DETR(-iRPE).

    python tools/train.py --config configs/detr_r50_irpe_product_ctx_k_9x9.yaml data.root=/data/coco
    torchrun --nproc_per_node 8 tools/train.py --config ... train.output_dir=outputs/irpe_9x9
    python tools/train.py --config ... --resume outputs/irpe_9x9/checkpoint.pth train.lr=5e-5
"""
import argparse
import sys

from detr_irpe.config import ConfigError, load_config
from detr_irpe.engine.train import train


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML config (see configs/)")
    parser.add_argument("--resume", help="checkpoint.pth of an interrupted run to continue")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.lr=2e-4 model.rpe=null")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        sys.exit(f"error: {e}")
    train(cfg, resume=args.resume)


if __name__ == "__main__":
    main()
