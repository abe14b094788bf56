#!/usr/bin/env python
"""Pretrain the tiny backbone on which categories each training image holds (no ImageNet weights
exist for it), then train DETR from the result:

    python tools/pretrain_backbone.py --config configs/demo.yaml --minutes 2 --out outputs/tiny_backbone.pth
    python tools/train.py --config configs/demo.yaml model.backbone_weights=outputs/tiny_backbone.pth

The data.* keys of the config (and overrides) name the training split; `make demo` does this
step for you.
"""
import sys

from detr_irpe.apps.cli import main as cli_main


def main(argv=None) -> int:
    """``detr-irpe pretrain-backbone`` with ``argv`` (default: the command line)."""
    return cli_main(argv, command="pretrain-backbone")


if __name__ == "__main__":
    sys.exit(main())
