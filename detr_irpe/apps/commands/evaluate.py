"""detr-irpe eval: COCO mAP of a checkpoint on the validation split of its (or the given) config, or
of any detector's results file against an annotations file (--results --annotations)."""
from __future__ import annotations

from ...config import EVAL_BACKENDS
from ...engine.evaluate import evaluate_checkpoint, evaluate_results
from ...errors import UsageError
from . import options


def add_arguments(p) -> None:
    p.add_argument("--checkpoint",
                   help="checkpoint: .pth or .safetensors file, Hugging Face folder or hub id, http(s) URL")
    p.add_argument("--config", help="YAML config (a path or a shipped name); default: the checkpoint's")
    options.device(p)
    p.add_argument("--results", help="instead of a checkpoint: a COCO results JSON (any detector's detections, "
                                     "e.g. detections.json) to score against --annotations")
    p.add_argument("--annotations", help="with --results: the COCO annotations JSON (e.g. instances_val2017.json)")
    p.add_argument("--iou-type", choices=("bbox", "segm"),
                   help="with --results: bbox or segm (default: segm for results with a segmentation and no bbox)")
    p.add_argument("--backend", choices=EVAL_BACKENDS,
                   help="what computes the AP (the same as eval.backend=...; default auto: the fastest installed "
                        "library identical to pycocotools; pycocotools: the reference)")
    p.add_argument("--no-pictures", action="store_true",
                   help="skip analysis.json and eval_pictures/ (per-class AP, PR curves, confusion matrix, sizes)")
    p.add_argument("--data-root", help="dataset root (the same as data.root=...)")
    p.add_argument("--output-dir", help="where metrics.json (and detections.json) go (default: eval_<name> "
                                        "beside the checkpoint or the results, numbered if taken)")
    p.add_argument("--batch-size", type=int, help="images per batch (default: the config's train.batch_size)")
    options.batched_backbone(p)
    p.add_argument("--strict", action="store_true",
                   help="fail when the model's classes are not the annotations' categories (default: a warning)")
    options.overwrite(p, "metrics.json / detections.json / analysis.json in --output-dir")
    options.overrides(p)


def run(args) -> int:
    if args.results or args.annotations:
        if not (args.results and args.annotations) or args.checkpoint:
            raise UsageError("scoring a results file takes --results and --annotations, and no --checkpoint")
        if args.overrides:
            raise UsageError(f"config overrides ({' '.join(args.overrides)}) do not apply to --results: there is "
                             f"no model; choose the library with --backend")
        metrics = evaluate_results(args.results, args.annotations, output_dir=args.output_dir,
                                   backend=args.backend or "auto", iou_type=args.iou_type,
                                   pictures=not args.no_pictures, overwrite=args.overwrite)
        print(f"metrics.json written to {metrics['output_dir']}")
        return 0
    if not args.checkpoint:
        raise UsageError("eval needs --checkpoint (a model to evaluate), or --results and --annotations "
                         "(detections to score)")
    overrides = list(args.overrides) + ([f"data.root={args.data_root}"] if args.data_root else [])
    overrides += [f"eval.backend={args.backend}"] if args.backend else []
    overrides += ["eval.pictures=false"] if args.no_pictures else []
    metrics = evaluate_checkpoint(args.checkpoint, args.config, overrides, output_dir=args.output_dir,
                                  device=args.device, batch_size=args.batch_size,
                                  batched_backbone=args.batched_backbone, overwrite=args.overwrite,
                                  strict=args.strict)
    print(f"metrics.json and the predictions written to {metrics['output_dir']}")
    return 0
