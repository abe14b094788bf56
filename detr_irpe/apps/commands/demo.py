"""detr-irpe demo: synthetic shapes, a small DETR-iRPE trained on a fixed schedule, COCO mAP, pictures
(with --masks, then its mask head on the frozen detector: mask AP, masks drawn)."""
from __future__ import annotations

from ..demo import DemoSettings, run_demo
from . import options


def add_arguments(p) -> None:
    d = DemoSettings()
    p.add_argument("--config", help="YAML config (default: the shipped demo.yaml)")
    p.add_argument("--budget-minutes", type=float,
                   help="optional cap on pretraining + training wall time; a run it cuts short says so "
                        "(its AP is then not the demo's)")
    p.add_argument("--output-dir", default=d.output_dir,
                   help="where the run goes (default %(default)s; -2, -3, ... when an earlier run is there)")
    p.add_argument("--data-root", default=d.data_root,
                   help="where the synthetic data is generated / reused (default %(default)s)")
    rpe = p.add_mutually_exclusive_group()
    rpe.add_argument("--rpe", help="iRPE spec of the encoder, e.g. rpe-2.0-product-ctx-1-k (default: the config's)")
    rpe.add_argument("--no-rpe", action="store_true", help="plain DETR encoder (same as model.rpe=null)")
    p.add_argument("--num-train", type=int, default=d.num_train, help="training images (default %(default)s)")
    p.add_argument("--num-val", type=int, default=d.num_val, help="validation images (default %(default)s)")
    p.add_argument("--image-size", type=int, default=d.image_size, help="image side in pixels (default %(default)s)")
    p.add_argument("--num-pictures", type=int, default=d.num_pictures,
                   help="validation images drawn with predictions vs ground truth (default %(default)s)")
    p.add_argument("--no-pictures", action="store_true", help="skip the pictures")
    p.add_argument("--max-iterations", type=int,
                   help="stop training (each stage) after this many iterations (a quick look)")
    p.add_argument("--masks", action="store_true",
                   help="then train DETR's mask head on the frozen detector (1500 iterations, into "
                        "<output-dir>/masks), evaluate mask AP and draw the masks")
    p.add_argument("--panoptic", action="store_true",
                   help="the panoptic variant: stuff bands behind the shapes (COCO panoptic data in "
                        "<data-root>_panoptic); the detector, then its mask head as --masks, evaluated by PQ")
    p.add_argument("--detector", help="with --masks: the detection checkpoint to freeze (e.g. an earlier "
                                      "demo's outputs/demo/checkpoint.pth) instead of training one")
    options.overrides(p)


def run(args) -> int:
    overrides = list(args.overrides)
    if args.no_rpe:
        overrides.append("model.rpe=null")
    elif args.rpe:
        overrides.append(f"model.rpe={args.rpe}")
    run_demo(DemoSettings(config=args.config, overrides=overrides, output_dir=args.output_dir,
                          data_root=args.data_root, budget_minutes=args.budget_minutes, num_train=args.num_train,
                          num_val=args.num_val, image_size=args.image_size, num_pictures=args.num_pictures,
                          pictures=not args.no_pictures, max_iterations=args.max_iterations, masks=args.masks, panoptic=args.panoptic,
                          detector=args.detector))
    return 0
