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
import argparse
import sys

from detr_irpe.config import ConfigError
from detr_irpe.engine.checkpoint import CheckpointError


def _layer(text):
    return text if text == "all" else int(text)


def _model_args(parser, images=True):
    parser.add_argument("--checkpoint", required=True,
                        help="checkpoint file (.pth, .safetensors), Hugging Face folder or hub id, or http(s) URL")
    parser.add_argument("--config", help="YAML config; default: the one stored in the checkpoint")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", required=True, help="output folder for the PNGs")
    if images:
        parser.add_argument("images", nargs="*", help="image files or folders")
        parser.add_argument("--val", type=int, metavar="N",
                            help="also the first N validation images of the config's dataset, with ground truth")


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("boxes", help="predicted boxes (with names and scores) beside the ground truth")
    _model_args(p)
    p.add_argument("--threshold", type=float, default=0.7, help="minimum score to draw a box")
    p.add_argument("--min-size", type=int, default=256,
                   help="draw images whose shorter side is smaller enlarged to this size (0: never)")

    p = sub.add_parser("attention", help="encoder attention of a pixel, decoder attention per detection")
    _model_args(p)
    p.add_argument("--pixel", type=float, nargs=2, metavar=("X", "Y"),
                   help="query pixel of the encoder attention, in the image's pixels (default: its centre)")
    p.add_argument("--layer", type=_layer, default=-1, help="encoder layer (negative from the end, or 'all')")
    p.add_argument("--decoder-layer", type=int, default=-1, help="decoder layer (negative from the end)")
    p.add_argument("--threshold", type=float, default=0.7, help="minimum score of a detection to show")
    p.add_argument("--max-objects", type=int, default=6, help="at most this many detection panels")
    p.add_argument("--alpha", type=float, default=0.5, help="heatmap opacity")
    p.add_argument("--interpolation", choices=("bilinear", "nearest"), default="bilinear",
                   help="how the feature-grid attention is upsampled to the image")
    p.add_argument("--min-size", type=int, default=256,
                   help="draw images whose shorter side is smaller enlarged to this size (0: never)")

    p = sub.add_parser("rpe", help="the learned iRPE lookup tables of the encoder")
    _model_args(p)
    p.add_argument("--layer", type=int, nargs="*", help="encoder layers to show (default: all)")
    p.add_argument("--pixel", type=float, nargs=2, metavar=("X", "Y"),
                   help="also plot the contribution q.r of the token at this pixel of the first image")

    p = sub.add_parser("curves", help="training curves of log.jsonl files")
    p.add_argument("logs", nargs="+", help="log.jsonl files, one per run")
    p.add_argument("--out", required=True, help="PNG file to write")
    p.add_argument("--names", nargs="*", help="legend names (default: each log's folder name)")
    p.add_argument("--title")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    from detr_irpe.visualize import commands

    common = lambda: dict(config=args.config, overrides=args.set, device=args.device)  # noqa: E731
    try:
        if args.command == "boxes":
            written = commands.draw_boxes(args.checkpoint, args.out, args.images, args.val, args.threshold,
                                          args.min_size, **common())
        elif args.command == "attention":
            written = commands.draw_attention(args.checkpoint, args.out, args.images, args.val, args.pixel,
                                              args.layer, args.decoder_layer, args.threshold, args.max_objects,
                                              args.alpha, args.interpolation, args.min_size, **common())
        elif args.command == "rpe":
            written = commands.draw_rpe_tables(args.checkpoint, args.out, args.layer or None, args.images, args.val,
                                               args.pixel, **common())
        else:
            written = [commands.plot_logs(args.logs, args.out, args.names, args.title)]
    except (ConfigError, CheckpointError, FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    for path in written:
        print(path)


if __name__ == "__main__":
    main()
