#!/usr/bin/env python
"""Pictures of a checkpoint: boxes, attention maps, learned iRPE tables, training curves.

    # predicted boxes beside the ground truth, first 4 validation images of the checkpoint's dataset
    python tools/visualize.py boxes --checkpoint outputs/demo/checkpoint.pth --val 4 --out outputs/viz
    # predicted boxes on your own images (no ground truth)
    python tools/visualize.py boxes --checkpoint ckpt.pth photos/ --out outputs/viz --threshold 0.5
    # encoder attention of pixel (x=200, y=150) in the last layer + decoder attention per detection
    python tools/visualize.py attention --checkpoint ckpt.pth --val 2 --pixel 200 150 --out outputs/viz
    # the learned iRPE lookup tables; with --pixel (and an image) also that token's q.r per bucket
    python tools/visualize.py rpe --checkpoint ckpt.pth --out outputs/viz [--val 1 --pixel 64 64]
    # training curves of several runs
    python tools/visualize.py curves outputs/run_a/log.jsonl outputs/run_b/log.jsonl --out curves.png
"""
import sys

from detr_irpe.apps.cli import main as cli_main


def main(argv=None) -> int:
    """``detr-irpe visualize`` with ``argv`` (default: the command line)."""
    return cli_main(argv, command="visualize")


if __name__ == "__main__":
    sys.exit(main())
