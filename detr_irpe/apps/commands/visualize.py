"""detr-irpe visualize: pictures of a checkpoint (boxes, attention maps, iRPE tables), of runs (curves),
or of an evaluation (per-class AP, PR curves, confusion matrix, sizes: redrawn from its files)."""
from __future__ import annotations

from ...visualize.eval_plots import redraw_eval
from .. import pictures
from . import curves, options


def _layer(text: str):
    return text if text == "all" else int(text)


def _picture_options(p) -> None:
    options.checkpoint(p)
    p.add_argument("--out", required=True, help="output folder for the PNGs")
    options.inputs_and_overrides(p, "image files or folders")
    p.add_argument("--val", type=int, metavar="N",
                   help="also the first N validation images of the config's dataset, with ground truth")
    options.overwrite(p, "pictures of an earlier run in --out")


def add_arguments(p) -> None:
    sub = p.add_subparsers(dest="picture", required=True, metavar="{boxes,attention,rpe,curves,eval}")
    q = sub.add_parser("boxes", help="predicted boxes (with names and scores) beside the ground truth")
    _picture_options(q)
    q.add_argument("--threshold", type=float, default=0.7, help="minimum score to draw a box")
    q.add_argument("--min-size", type=int, default=256,
                   help="draw images whose shorter side is smaller enlarged to this size (0: never)")

    q = sub.add_parser("attention", help="encoder attention of a pixel, decoder attention per detection")
    _picture_options(q)
    q.add_argument("--pixel", type=float, nargs=2, metavar=("X", "Y"),
                   help="query pixel of the encoder attention, in the image's pixels (default: its centre)")
    q.add_argument("--layer", type=_layer, default=-1, help="encoder layer (negative from the end, or 'all')")
    q.add_argument("--decoder-layer", type=int, default=-1, help="decoder layer (negative from the end)")
    q.add_argument("--threshold", type=float, default=0.7, help="minimum score of a detection to show")
    q.add_argument("--max-objects", type=int, default=6, help="at most this many detection panels")
    q.add_argument("--alpha", type=float, default=0.5, help="heatmap opacity")
    q.add_argument("--interpolation", choices=("bilinear", "nearest"), default="bilinear",
                   help="how the feature-grid attention is upsampled to the image")
    q.add_argument("--min-size", type=int, default=256,
                   help="draw images whose shorter side is smaller enlarged to this size (0: never)")

    q = sub.add_parser("rpe", help="the learned iRPE lookup tables of the encoder")
    _picture_options(q)
    q.add_argument("--layer", type=int, nargs="*", help="encoder layers to show (default: all)")
    q.add_argument("--pixel", type=float, nargs=2, metavar=("X", "Y"),
                   help="also plot the contribution q.r of the token at this pixel of the first image")

    q = sub.add_parser("curves", help="training curves of runs in one PNG (the same as plot-logs)")
    curves.add_arguments(q)

    q = sub.add_parser("eval", help="the pictures that explain an AP, redrawn from an evaluation folder "
                                    "(analysis.json: all four) or a metrics.json (per-class AP and sizes)")
    q.add_argument("source", help="an evaluation folder (eval or a training run), its analysis.json or metrics.json")
    q.add_argument("--out", required=True, help="output folder for the PNGs")
    q.add_argument("--worst", type=int, default=5, help="categories with the lowest AP drawn in the PR curves")
    options.overwrite(q, "pictures of an earlier run in --out")


def run(args) -> int:
    if args.picture == "curves":
        return curves.run(args)
    if args.picture == "eval":
        for path in redraw_eval(args.source, args.out, worst=args.worst, overwrite=args.overwrite):
            print(path)
        return 0
    images, overrides = options.split_items(args.items)
    common = dict(config=args.config, overrides=overrides, device=args.device, overwrite=args.overwrite)
    if args.picture == "boxes":
        written = pictures.draw_boxes(args.checkpoint, args.out, images, args.val, args.threshold, args.min_size,
                                      **common)
    elif args.picture == "attention":
        written = pictures.draw_attention(args.checkpoint, args.out, images, args.val, args.pixel, args.layer,
                                          args.decoder_layer, args.threshold, args.max_objects, args.alpha,
                                          args.interpolation, args.min_size, **common)
    else:
        written = pictures.draw_rpe_tables(args.checkpoint, args.out, args.layer or None, images, args.val,
                                           args.pixel, **common)
    for path in written:
        print(path)
    return 0
