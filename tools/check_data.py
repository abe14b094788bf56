#!/usr/bin/env python
"""Check a COCO-format dataset before training: every problem, grouped, with counts and examples.

    python tools/check_data.py --annotations data/coco/annotations/instances_val2017.json --images data/coco/val2017
    python tools/check_data.py --config configs/detr_r50.yaml --split both data.root=/data/coco
    python tools/check_data.py --config configs/detr_r50.yaml --split train --no-images   # json + file existence

Exit code 0 when there are no errors (warnings are problems the loader tolerates; --strict
counts them too), 1 otherwise.
"""
import argparse
import sys

from detr_irpe.config import ConfigError, load_config
from detr_irpe.data.check import check_config_splits, check_dataset, report_and_exit_code


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--annotations", help="COCO annotation json (instead of --config)")
    parser.add_argument("--images", help="image folder of --annotations")
    parser.add_argument("--config", help="YAML config whose data.* keys name the dataset")
    parser.add_argument("--split", choices=["train", "val", "both"], default="both", help="with --config")
    parser.add_argument("--no-images", action="store_true", help="do not decode images (only check they exist)")
    parser.add_argument("--workers", type=int, default=None, help="threads decoding images (default: up to 8)")
    parser.add_argument("--examples", type=int, default=3, help="examples shown per kind of problem")
    parser.add_argument("--strict", action="store_true", help="exit 1 on warnings too")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. data.root=/data/coco")
    args = parser.parse_args(argv)
    options = dict(decode=not args.no_images, workers=args.workers, progress=sys.stderr.isatty(),
                   max_examples=max(args.examples, 1))
    if args.annotations:
        if args.config or args.overrides:
            parser.error("give either --annotations (with --images) or --config [overrides], not both")
        reports = {"dataset": check_dataset(args.annotations, args.images, **options)}
    else:
        try:
            cfg = load_config(args.config, args.overrides)
        except ConfigError as e:
            sys.exit(f"error: {e}")
        splits = ("train", "val") if args.split == "both" else (args.split,)
        reports = check_config_splits(cfg.data, splits, **options)
    sys.exit(report_and_exit_code(reports, strict=args.strict, max_examples=args.examples))


if __name__ == "__main__":
    main()
