"""detr-irpe eval: COCO mAP of a checkpoint on the validation split of its (or the given) config."""
from __future__ import annotations

from ...engine.evaluate import evaluate_checkpoint
from . import options


def add_arguments(p) -> None:
    options.checkpoint(p)
    p.add_argument("--data-root", help="dataset root (the same as data.root=...)")
    p.add_argument("--output-dir", help="where detections.json and metrics.json go (default: eval_<name> "
                                        "beside the checkpoint, numbered if taken)")
    p.add_argument("--batch-size", type=int, help="images per batch (default: the config's train.batch_size)")
    options.batched_backbone(p)
    p.add_argument("--strict", action="store_true",
                   help="fail when the model's classes are not the annotations' categories (default: a warning)")
    options.overwrite(p, "metrics.json / detections.json in --output-dir")
    options.overrides(p)


def run(args) -> int:
    overrides = list(args.overrides) + ([f"data.root={args.data_root}"] if args.data_root else [])
    metrics = evaluate_checkpoint(args.checkpoint, args.config, overrides, output_dir=args.output_dir,
                                  device=args.device, batch_size=args.batch_size,
                                  batched_backbone=args.batched_backbone, overwrite=args.overwrite,
                                  strict=args.strict)
    print(f"metrics.json and detections.json written to {metrics['output_dir']}")
    return 0
