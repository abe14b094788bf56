"""End-to-end cost of iRPE in DETR-R50: a training step and inference, with and without iRPE.

    python benchmarks/end_to_end.py                      # 800x1066, batch 2 (DETR's evaluation size)
    python benchmarks/end_to_end.py --size 512 683 --reps 3 --device cuda --amp bf16

Both models are built from the same seed and timed in alternation (plain, iRPE, plain, ...), so a
load change on the machine hits both alike; the ratio is measured in this one run. With
``--one-at-a-time`` only one model (and its optimizer) is in memory at once: plain, iRPE,
plain, iRPE, each built, warmed up and timed in turn.
"""
import argparse
import statistics
import time

import torch

from detr_irpe.config import TrainConfig
from detr_irpe.engine.step import train_step
from detr_irpe.engine.optim import build_optimizer
from detr_irpe.models import build_detr
from machine import describe


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def make_batch(batch, size, device):
    g = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, *size, generator=g).to(device)
    masks = torch.zeros(batch, *size, dtype=torch.bool, device=device)
    targets = [{"labels": torch.randint(1, 91, (4,), generator=g).to(device),
                "boxes": (torch.rand(4, 4, generator=g) * 0.4 + 0.2).to(device)} for _ in range(batch)]
    return images, masks, targets


def step(model, criterion, optimizer, batch, amp):
    """The training loop's own step, with the COCO configs' clipping."""
    train_step(model, criterion, optimizer, batch, amp=amp, clip_max_norm=TrainConfig.clip_max_norm)


@torch.no_grad()
def infer(model, batch, amp):
    images, masks, _ = batch
    with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=amp == "bf16"):
        model(images, masks)


def timed(fn, device):
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, nargs=2, default=[800, 1066], metavar=("H", "W"))
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--reps", type=int, default=3, help="timed repetitions per model (after 1 warm-up)")
    parser.add_argument("--rpe", default="rpe-2.0-product-ctx-1-k")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--amp", choices=["none", "bf16"], default="none")
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--one-at-a-time", action="store_true", help="never hold both models in memory")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.one_at_a_time:
        return one_at_a_time(args, device)

    runs = {name: build(args.backbone, rpe, device) for name, rpe in [("plain", None), ("irpe", args.rpe)]}
    batch = make_batch(args.batch, tuple(args.size), device)

    times = {(name, kind): [] for name in runs for kind in ("train", "infer")}
    for rep in range(args.reps + 1):  # rep 0 warms up
        for name, (model, criterion, optimizer) in runs.items():
            model.train()
            t_train = timed(lambda: step(model, criterion, optimizer, batch, args.amp), device)
            model.eval()
            t_infer = timed(lambda: infer(model, batch, args.amp), device)
            if rep > 0:
                times[(name, "train")].append(t_train)
                times[(name, "infer")].append(t_infer)

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else describe()
    print(f"DETR-{args.backbone}, batch {args.batch} at {args.size[0]}x{args.size[1]}, amp={args.amp}, {where}, torch {torch.__version__}")
    print(f"{'model':8s} {'train step (s)':>15s} {'inference img/s':>16s}")
    med = {k: statistics.median(v) for k, v in times.items()}
    for name in runs:
        print(f"{name:8s} {med[(name, 'train')]:15.3f} {args.batch / med[(name, 'infer')]:16.2f}")
    print(f"iRPE / plain: train step {med[('irpe', 'train')] / med[('plain', 'train')]:.3f}x, "
          f"inference time {med[('irpe', 'infer')] / med[('plain', 'infer')]:.3f}x  ({args.rpe})")
    return med


def build(backbone, rpe, device):
    torch.manual_seed(0)
    model, criterion, _ = build_detr(backbone=backbone, backbone_weights="none", rpe=rpe)
    model.to(device).train()
    criterion.to(device)
    optimizer = build_optimizer(model, TrainConfig())  # the training loop's groups: backbone at 1e-5
    return model, criterion, optimizer


def one_at_a_time(args, device):
    batch = make_batch(args.batch, tuple(args.size), device)
    steps = {"plain": [], "irpe": []}
    for name in ("plain", "irpe", "plain", "irpe"):
        parts = build(args.backbone, None if name == "plain" else args.rpe, device)
        step(*parts, batch, args.amp)  # warm-up
        times = [timed(lambda: step(*parts, batch, args.amp), device) for _ in range(args.reps)]
        steps[name].append(statistics.median(times))
        print(f"{name:6s} train step {steps[name][-1]:.3f} s  ({', '.join(f'{t:.2f}' for t in times)})", flush=True)
        parts = None  # free this model before the next is built
    mean = {k: statistics.mean(v) for k, v in steps.items()}
    print(f"iRPE / plain: train step {mean['irpe'] / mean['plain']:.3f}x (means of two rounds; {args.rpe})")
    return mean


if __name__ == "__main__":
    main()
