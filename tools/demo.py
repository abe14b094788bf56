#!/usr/bin/env python
"""The end-to-end demo: synthetic shapes, a small DETR-iRPE trained for a fixed time budget,
COCO mAP on the validation split, pictures.

    python tools/demo.py                              # 15 minutes (what `make demo` runs)
    python tools/demo.py --budget-minutes 5 --no-rpe  # the plain encoder, 5 minutes
    python tools/demo.py train.lr=1e-3 --output-dir outputs/demo_lr
"""
import sys

from detr_irpe.apps.cli import main as cli_main


def main(argv=None) -> int:
    """``detr-irpe demo`` with ``argv`` (default: the command line)."""
    return cli_main(argv, command="demo")


if __name__ == "__main__":
    sys.exit(main())
