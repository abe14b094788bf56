#!/usr/bin/env python
"""The end-to-end demo: synthetic shapes, a small DETR-iRPE trained for a fixed time budget,
COCO mAP on the validation split, pictures.

    python tools/demo.py                              # 15 minutes (what `make demo` runs)
    python tools/demo.py --budget-minutes 5 --no-rpe  # the plain encoder, 5 minutes
    python tools/demo.py train.lr=1e-3 --output-dir outputs/demo_lr
"""
import argparse
import sys

from detr_irpe.config import ConfigError
from detr_irpe.demo import DemoSettings, run_demo


def main(argv=None):
    d = DemoSettings()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML config (default: configs/demo.yaml)")
    parser.add_argument("--budget-minutes", type=float, default=d.budget_minutes,
                        help="wall-clock budget for data, training, evaluation and pictures (default %(default)s)")
    parser.add_argument("--output-dir", default=d.output_dir, help="where the run goes (default %(default)s)")
    parser.add_argument("--data-root", default=d.data_root,
                        help="where the synthetic data is generated / reused (default %(default)s)")
    rpe = parser.add_mutually_exclusive_group()
    rpe.add_argument("--rpe", help="iRPE spec of the encoder, e.g. rpe-2.0-product-ctx-1-k (default: the config's)")
    rpe.add_argument("--no-rpe", action="store_true", help="plain DETR encoder (same as model.rpe=null)")
    parser.add_argument("--num-train", type=int, default=d.num_train, help="training images (default %(default)s)")
    parser.add_argument("--num-val", type=int, default=d.num_val, help="validation images (default %(default)s)")
    parser.add_argument("--image-size", type=int, default=d.image_size, help="image side in pixels (default %(default)s)")
    parser.add_argument("--num-pictures", type=int, default=d.num_pictures,
                        help="validation images drawn with predictions vs ground truth (default %(default)s)")
    parser.add_argument("--no-pictures", action="store_true", help="skip the pictures")
    parser.add_argument("--max-iterations", type=int, help="stop training after this many iterations")
    parser.add_argument("--pretrain-fraction", type=float, default=d.pretrain_fraction,
                        help="share of the budget for backbone pretraining; 0 trains DETR from scratch "
                             "(default %(default)s)")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. train.lr=1e-3")
    args = parser.parse_args(argv)

    overrides = list(args.overrides)
    if args.no_rpe:
        overrides.append("model.rpe=null")
    elif args.rpe:
        overrides.append(f"model.rpe={args.rpe}")
    settings = DemoSettings(config=args.config, overrides=overrides, output_dir=args.output_dir,
                            data_root=args.data_root, budget_minutes=args.budget_minutes, num_train=args.num_train,
                            num_val=args.num_val, image_size=args.image_size, num_pictures=args.num_pictures,
                            pictures=not args.no_pictures, max_iterations=args.max_iterations,
                            pretrain_fraction=args.pretrain_fraction)
    try:
        run_demo(settings)
    except ConfigError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
