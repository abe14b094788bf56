"""Generate (or reuse) the synthetic shapes dataset in COCO format.

    python datasets/make_synthetic.py --root data/shapes --num-train 2000 --num-val 200 --image-size 128

Then train on it with the data.* overrides this script prints.
"""
from __future__ import annotations

import argparse

from detr_irpe.data.synthetic import SHAPES, ensure_synthetic_dataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="data/shapes",
                        help="output folder (reused if generated with the same options)")
    parser.add_argument("--num-train", type=int, default=2000)
    parser.add_argument("--num-val", type=int, default=200)
    parser.add_argument("--image-size", type=int, default=128, help="side of the square images, in pixels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-objects", type=int, default=6, help="objects per image: 1 to this")
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=SHAPES, help="categories, in id order")
    args = parser.parse_args()
    dataset = ensure_synthetic_dataset(args.root, args.num_train, args.num_val, args.image_size, args.seed,
                                       max_objects=args.max_objects, shapes=args.shapes)
    print(f"{'generated' if dataset.generated else 'reused'} {dataset.root} "
          f"(num_classes {dataset.num_classes}); config overrides:")
    print(" ".join(dataset.config_overrides() + [f"model.num_classes={dataset.num_classes}"]))


if __name__ == "__main__":
    main()
