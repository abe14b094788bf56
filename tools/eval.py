#!/usr/bin/env python
"""COCO mAP of a checkpoint (ours, an official DETR one or an iRPE model-zoo one; path or URL).

    python tools/eval.py --checkpoint detr-r50-e632da11.pth --data-root /data/coco
    python tools/eval.py --config configs/demo.yaml --checkpoint outputs/demo/checkpoint.pth
    torchrun --nproc_per_node 8 tools/eval.py --checkpoint ... --data-root /data/coco
"""
import argparse
import sys

from detr_irpe.config import ConfigError
from detr_irpe.engine.evaluate import evaluate_checkpoint


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True,
                        help="checkpoint file (.pth, .safetensors), Hugging Face folder or hub id, or http(s) URL")
    parser.add_argument("--config", help="YAML config; default: the one stored in the checkpoint")
    parser.add_argument("--data-root", help="dataset root (data.root)")
    parser.add_argument("--output-dir", help="where detections.json and metrics.json go")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--device", default="auto")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. data.val_annotations=...")
    args = parser.parse_args(argv)
    overrides = list(args.overrides) + ([f"data.root={args.data_root}"] if args.data_root else [])
    try:
        evaluate_checkpoint(args.checkpoint, args.config, overrides, args.output_dir, args.device, args.batch_size)
    except ConfigError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
