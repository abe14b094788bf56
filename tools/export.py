#!/usr/bin/env python
"""Export a checkpoint to ONNX (or a torch.export program), with a JSON of what deployment needs.

    python tools/export.py --checkpoint outputs/demo/checkpoint.pth --out model.onnx
    python tools/export.py --checkpoint detr-r50-e632da11.pth --out detr.onnx --opset 18
    python tools/export.py --checkpoint CKPT --out model.pt2 --format torch-export
"""
import sys

from detr_irpe.apps.cli import main as cli_main


def main(argv=None) -> int:
    """``detr-irpe export`` with ``argv`` (default: the command line)."""
    return cli_main(argv, command="export")


if __name__ == "__main__":
    sys.exit(main())
