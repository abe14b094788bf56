#!/usr/bin/env python
"""COCO mAP of a checkpoint (ours, an official DETR one or an iRPE model-zoo one; path or URL).

    python tools/eval.py --checkpoint detr-r50-e632da11.pth --data-root /data/coco
    python tools/eval.py --config configs/demo.yaml --checkpoint outputs/demo/checkpoint.pth
    torchrun --nproc_per_node 8 tools/eval.py --checkpoint ... --data-root /data/coco
"""
import sys

from detr_irpe.apps.cli import main as cli_main


def main(argv=None) -> int:
    """``detr-irpe eval`` with ``argv`` (default: the command line)."""
    return cli_main(argv, command="eval")


if __name__ == "__main__":
    sys.exit(main())
