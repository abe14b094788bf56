"""detr-irpe predict: draw a checkpoint's (or an ONNX export's) detections on images."""
from __future__ import annotations

from ...errors import UsageError
from ..predict import predict_onnx, predict_path
from . import options


def add_arguments(p) -> None:
    model = p.add_mutually_exclusive_group(required=True)
    model.add_argument("--checkpoint", help="checkpoint: .pth or .safetensors file, Hugging Face folder or hub id, "
                                            "http(s) URL")
    model.add_argument("--onnx", help="a model.onnx written by detr-irpe export (model.onnx.json beside it), "
                                      "run with ONNX Runtime")
    p.add_argument("--config", help="YAML config (a path or a shipped name); default: the checkpoint's")
    options.device(p)
    options.inputs_and_overrides(p, "image files or folders")
    p.add_argument("--out", required=True, help="output folder for PNGs and detections.json (not the inputs' folder)")
    p.add_argument("--threshold", type=float, default=0.7, help="minimum score to keep a box (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=1, help="images per batch (default %(default)s)")
    p.add_argument("--recursive", action="store_true",
                   help="take the images of subfolders too (a/cat.jpg is drawn to a_cat.png)")
    options.batched_backbone(p)
    options.overwrite(p, "pictures and detections.json of an earlier run in --out")


def run(args) -> int:
    inputs, overrides = options.split_items(args.items)
    if not inputs:
        raise UsageError("no images given: pass image files or folders (before or after the options)")
    if args.onnx:
        if args.config or overrides or args.batched_backbone:
            raise UsageError("--config, KEY=VALUE overrides and --batched-backbone apply to --checkpoint; an ONNX "
                             "model carries its preprocessing in its .json")
        results = predict_onnx(args.onnx, inputs, args.out, args.threshold, batch_size=args.batch_size,
                               overwrite=args.overwrite, recursive=args.recursive)
    else:
        results = predict_path(args.checkpoint, inputs, args.out, args.threshold, config_path=args.config,
                               overrides=overrides, device=args.device, batch_size=args.batch_size,
                               batched_backbone=args.batched_backbone, overwrite=args.overwrite,
                               recursive=args.recursive)
    total = sum(len(r["detections"]) for r in results)
    skipped = sum("error" in r for r in results)
    note = f" ({skipped} skipped, each named above)" if skipped else ""
    print(f"{len(results) - skipped} images{note}, {total} detections >= {args.threshold}: "
          f"pictures and detections.json in {args.out}")
    return 0
