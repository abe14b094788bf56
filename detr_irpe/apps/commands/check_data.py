"""detr-irpe check-data: every problem of a COCO-format dataset, grouped, with examples."""
from __future__ import annotations

import sys

from ...config import load_config
from ...data.check import check_config_splits, check_dataset, report_and_exit_code
from ...errors import UsageError
from . import options


def add_arguments(p) -> None:
    p.add_argument("--annotations", help="COCO annotation json (instead of --config)")
    p.add_argument("--images", help="image folder of --annotations")
    p.add_argument("--config", help="YAML config whose data.* keys name the dataset")
    p.add_argument("--split", choices=["train", "val", "both"], default="both", help="with --config")
    p.add_argument("--no-images", action="store_true", help="do not decode images (only check they exist)")
    p.add_argument("--workers", type=int, default=None, help="threads decoding images (default: up to 8)")
    p.add_argument("--examples", type=int, default=3, help="examples shown per kind of problem")
    p.add_argument("--strict", action="store_true", help="exit 1 on warnings too")
    p.add_argument("--masks", action="store_true",
                   help="check the segmentations too, as instance-segmentation training reads them (implied by "
                        "a --config with model.masks=true)")
    p.add_argument("--panoptic", metavar="PNG_FOLDER",
                   help="--annotations is COCO panoptic json and this its PNG folder: checks every PNG too (implied "
                        "by a --config with data.dataset=coco_panoptic)")
    options.overrides(p)


def run(args) -> int:
    settings = dict(decode=not args.no_images, workers=args.workers, progress=sys.stderr.isatty(),
                    max_examples=max(args.examples, 1))
    if args.annotations:
        if args.config or args.overrides:
            raise UsageError("give either --annotations (with --images) or --config [overrides], not both")
        reports = {"dataset": check_dataset(args.annotations, args.images, masks=args.masks,
                                             panoptic=args.panoptic, **settings)}
    else:
        cfg = load_config(args.config, args.overrides)
        splits = ("train", "val") if args.split == "both" else (args.split,)
        reports = check_config_splits(cfg.data, splits, masks=args.masks or cfg.model.masks, **settings)
    return report_and_exit_code(reports, strict=args.strict, max_examples=args.examples)
