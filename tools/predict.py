#!/usr/bin/env python
"""Draw a checkpoint's detections on an image or a folder of images.

    python tools/predict.py --checkpoint outputs/demo/checkpoint.pth data/shapes/val --out outputs/pred
"""
import sys

from detr_irpe.apps.cli import main as cli_main


def main(argv=None) -> int:
    """``detr-irpe predict`` with ``argv`` (default: the command line)."""
    return cli_main(argv, command="predict")


if __name__ == "__main__":
    sys.exit(main())
