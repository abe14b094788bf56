#!/usr/bin/env python
"""Convert a checkpoint: ours (.pth), .safetensors, or a Hugging Face transformers DETR folder;
the same as `detr-irpe convert-checkpoint`.

    python tools/convert_checkpoint.py --to ours facebook/detr-resnet-50 detr-r50-hf.pth       # hub id or folder
    python tools/convert_checkpoint.py --to safetensors outputs/run/checkpoint.pth model.safetensors
    python tools/convert_checkpoint.py --to hf outputs/run/checkpoint.pth detr-hf/              # plain DETR only

SRC is anything the other tools accept as --checkpoint (a .pth or .safetensors file, a
transformers folder or hub id, an http(s) URL). Only the model travels: weights, config and
category names.
"""
import sys

from detr_irpe.apps.cli import main as cli_main


def main(argv=None) -> int:
    """``detr-irpe convert-checkpoint`` with ``argv`` (default: the command line)."""
    return cli_main(argv, command="convert-checkpoint")


if __name__ == "__main__":
    sys.exit(main())
