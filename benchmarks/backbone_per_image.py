"""What batch-independent predictions cost: DETR inference with the CNN run per image (the default
of evaluation and prediction) against the CNN run on the padded batch, measured in one run.

    python benchmarks/backbone_per_image.py                       # DETR-R50 + iRPE, batch 4, CPU
    python benchmarks/backbone_per_image.py --device cuda --batch 8 --reps 10

The batch holds images of different sizes (COCO-like: 800 x 1066, 800 x 600, ...), so the padded
batch is 800 x 1066. Both modes are timed in alternation on the same model and inputs; the
script prints images per second of each and their ratio.
"""
import argparse
import statistics
import time

import torch

from detr_irpe.models import build_detr
from detr_irpe.structures import pad_images
from machine import describe

SIZES = [(800, 1066), (800, 600), (608, 800), (704, 1000), (800, 800), (576, 800), (800, 1200), (640, 853)]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--reps", type=int, default=3, help="timed repetitions per mode (after 1 warm-up)")
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--rpe", default="rpe-2.0-product-ctx-1-k")
    parser.add_argument("--scale", type=float, default=1.0, help="scale the image sizes (0.5: a quick run)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)

    torch.manual_seed(0)
    model = build_detr(backbone=args.backbone, backbone_weights="none", rpe=args.rpe)[0].to(device).eval()
    sizes = [(int(h * args.scale), int(w * args.scale)) for h, w in (SIZES * args.batch)[: args.batch]]
    images, mask = pad_images([torch.randn(3, h, w) for h, w in sizes])
    images, mask = images.to(device), mask.to(device)

    def run(per_image: bool) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.no_grad():
            model(images, mask, batched_backbone=not per_image)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    times = {True: [], False: []}
    for rep in range(args.reps + 1):
        for per_image in (False, True):
            t = run(per_image)
            if rep:
                times[per_image].append(t)
    batched, per_image = statistics.median(times[False]), statistics.median(times[True])
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else describe()
    print(f"DETR-{args.backbone} + {args.rpe}, batch {args.batch} of sizes {sizes}, {where}, torch {torch.__version__}")
    print(f"CNN on the padded batch: {args.batch / batched:6.2f} img/s")
    print(f"CNN per image (default): {args.batch / per_image:6.2f} img/s")
    print(f"per image / batched time: {per_image / batched:.3f}x")


if __name__ == "__main__":
    main()
