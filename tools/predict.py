#!/usr/bin/env python
"""Draw a checkpoint's detections on an image or a folder of images.

    python tools/predict.py --checkpoint outputs/demo/checkpoint.pth data/shapes/val --out outputs/pred
"""
import argparse
import sys

from detr_irpe.config import ConfigError
from detr_irpe.engine.predict import predict_path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True,
                        help="checkpoint file (.pth, .safetensors), Hugging Face folder or hub id, or http(s) URL")
    parser.add_argument("inputs", nargs="+", help="image files or folders")
    parser.add_argument("--out", required=True, help="output folder for PNGs and detections.json")
    parser.add_argument("--threshold", type=float, default=0.7, help="minimum score to keep a box")
    parser.add_argument("--config", help="YAML config; default: the one stored in the checkpoint")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides")
    args = parser.parse_args(argv)
    try:
        results = predict_path(args.checkpoint, args.inputs, args.out, args.threshold, args.config, args.set,
                               args.device)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    total = sum(len(r["detections"]) for r in results)
    skipped = sum("error" in r for r in results)
    note = f" ({skipped} unreadable, skipped)" if skipped else ""
    print(f"{len(results) - skipped} images{note}, {total} detections >= {args.threshold}: "
          f"pictures and detections.json in {args.out}")


if __name__ == "__main__":
    main()
