#!/usr/bin/env python
"""Train DETR(-iRPE); the same as `detr-irpe train`.

    python tools/train.py --config configs/detr_r50_irpe_product_ctx_k_9x9.yaml data.root=/data/coco
    torchrun --nproc_per_node 8 tools/train.py --config ... train.output_dir=outputs/irpe_9x9
    python tools/train.py --config ... --resume outputs/irpe_9x9/checkpoint.pth train.lr=5e-5
    python tools/train.py --config ... --check-data     # check the train and val data, then stop
"""
import sys

from detr_irpe.apps.cli import main as cli_main


def main(argv=None) -> int:
    """``detr-irpe train`` with ``argv`` (default: the command line)."""
    return cli_main(argv, command="train")


if __name__ == "__main__":
    sys.exit(main())
