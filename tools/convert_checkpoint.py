#!/usr/bin/env python
"""Convert a checkpoint: ours (.pth), .safetensors, or a Hugging Face transformers DETR folder.

    python tools/convert_checkpoint.py --to ours facebook/detr-resnet-50 detr-r50-hf.pth       # hub id or folder
    python tools/convert_checkpoint.py --to safetensors outputs/run/checkpoint.pth model.safetensors
    python tools/convert_checkpoint.py --to hf outputs/run/checkpoint.pth detr-hf/              # plain DETR only

SRC is anything the other tools accept as --checkpoint (a .pth or .safetensors file, a
transformers folder or hub id, an http(s) URL). Only the model travels: weights, config and
category names.
"""
import argparse
import sys

from detr_irpe.engine.convert import FORMATS, convert_checkpoint
from detr_irpe.errors import DetrIrpeError


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--to", required=True, choices=FORMATS,
                        help="hf: folder for transformers' from_pretrained; ours: .pth; safetensors: .safetensors")
    parser.add_argument("--hf-backbone", choices=("native", "timm"),
                        help="--to hf: transformers' own ResNet (default; loads without timm) or timm's "
                             "(the default for DC5, which transformers dilates only with timm)")
    parser.add_argument("src", help="checkpoint file, Hugging Face folder or hub id, or http(s) URL")
    parser.add_argument("out", help="output file (ours, safetensors) or folder (hf)")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        out = convert_checkpoint(args.src, args.out, args.to, args.hf_backbone)
    except DetrIrpeError as e:
        sys.exit(f"error: {e}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
