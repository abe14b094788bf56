"""Training on fewer GPUs: what activation checkpointing saves and costs, and what the weight EMA and
gradient accumulation add to an optimizer step. DETR-R50 + iRPE (rpe-2.0-product-ctx-1-k, random
weights, dropout 0.1 as DETR trains).

    python benchmarks/training_memory.py                       # 800x1066, batch 2, on the CPU
    python benchmarks/training_memory.py --size 512 683 --reps 2
    python benchmarks/training_memory.py --device cuda --amp bf16

One model: the checkpointing choices are switched on it in turn
(``models.checkpointing.set_activation_checkpointing``), and timed round-robin, so a change in
background load hits all alike. Every ratio is measured in this one run.

* activation peak: the most memory held at once during forward + backward above what was held
  before, the gradients already allocated (backward adds into them): activations and
  temporaries. On CPU from ``torch.profiler``'s record of every allocation of the CPU allocator
  (``attention._cpu_peak_bytes``), on CUDA ``max_memory_allocated``.
* step peak: the same over a whole ``train_step`` (gradients freed before, then allocated in
  backward; clipping, AdamW).
* step time: median of ``--reps`` ``train_step`` calls (the training loop's own step).
* EMA: ``ModelEMA.update`` (the fused foreach lerp / copy) against the step.
* accumulation: a ``train_step`` of ``--accumulate`` micro-batches against a naive accumulation
  loop over the same micro-batches (each loss divided by its own counts and by k: not exact),
  timed round-robin, and what ``train_step`` does on top, the normalisers computed from the
  targets, timed alone.
"""
import argparse
import statistics
import time

import torch
from torch import nn

from attention import _cpu_peak_bytes, time_round_robin
from detr_irpe.config import TrainConfig
from detr_irpe.engine.ema import ModelEMA
from detr_irpe.engine.optim import build_optimizer
from detr_irpe.engine.step import autocast_context, step_normalizers, train_step
from detr_irpe.models import build_detr
from detr_irpe.models.checkpointing import set_activation_checkpointing
from machine import describe

CHOICES = {"none": [], "backbone": ["backbone"], "encoder": ["encoder"], "decoder": ["decoder"],
           "all three": ["backbone", "encoder", "decoder"]}


def make_batch(batch, size, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, *size, generator=g).to(device)
    masks = torch.zeros(batch, *size, dtype=torch.bool, device=device)
    targets = [{"labels": torch.randint(1, 91, (4,), generator=g).to(device),
                "boxes": (torch.rand(4, 4, generator=g) * 0.4 + 0.2).to(device)} for _ in range(batch)]
    return images, masks, targets


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_bytes(run, device) -> int:
    """Bytes held at the peak of ``run()`` above those held before it."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    return _cpu_peak_bytes(run)


def median_seconds(run, device, reps) -> float:
    times = []
    for _ in range(reps):
        sync(device)
        start = time.perf_counter()
        run()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, nargs=2, default=[800, 1066], metavar=("H", "W"))
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--accumulate", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--amp", default="none", choices=["none", "bf16", "fp16"])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--small", action="store_true", help="a tiny model, for the tests")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"# training memory benchmark: {describe()}, device {device}")
    print(f"# {args.backbone} + rpe-2.0-product-ctx-1-k, batch {args.batch} at {args.size[0]}x{args.size[1]}, "
          f"amp {args.amp}, median of {args.reps}")

    torch.manual_seed(0)
    options = dict(backbone=args.backbone, backbone_weights="none", rpe="rpe-2.0-product-ctx-1-k")
    if args.small:
        options.update(hidden_dim=32, nheads=4, enc_layers=2, dec_layers=2, dim_feedforward=64, num_queries=10)
    model, criterion, _ = build_detr(**options)
    model.to(device).train()
    criterion.to(device)
    optimizer = build_optimizer(model, TrainConfig())
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
    batch = make_batch(args.batch, args.size, device)
    clip = TrainConfig.clip_max_norm

    def step(batches=batch, ema=None):
        train_step(model, criterion, optimizer, batches, amp=args.amp, scaler=scaler, clip_max_norm=clip, ema=ema)

    def forward_backward():
        images, masks, targets = batch
        with autocast_context(device, args.amp):
            outputs = model(images, masks)
        criterion.weighted_loss(criterion(outputs, targets)).backward()

    step()  # AdamW's moments and the iRPE bucket ids exist before anything is measured

    # -- activation checkpointing ------------------------------------------------------------------
    rows = {}
    for name, parts in CHOICES.items():
        set_activation_checkpointing(model, parts)
        for p in model.parameters():  # gradients allocated before: backward adds into them
            p.grad = torch.zeros_like(p) if p.requires_grad else None
        activations = peak_bytes(forward_backward, device)
        step_peak = None
        if name in ("none", "all three"):
            optimizer.zero_grad(set_to_none=True)  # as every step starts: backward allocates them
            step_peak = peak_bytes(step, device)
        rows[name] = {"activations": activations, "step": step_peak}

    def with_parts(parts):
        def run():
            set_activation_checkpointing(model, parts)
            step()
        return run

    times = time_round_robin({name: with_parts(parts) for name, parts in CHOICES.items()}, args.reps, 0, device)
    set_activation_checkpointing(model, [])
    base = rows["none"]
    print("\n| checkpointing | activation peak | vs none | step peak | vs none | step time | vs none |")
    print("|---|---|---|---|---|---|---|")
    for name, row in rows.items():
        step_cells = ("-", "-") if row["step"] is None else (
            f"{row['step'] / 2**20:.0f} MiB", f"{row['step'] / base['step'] - 1:+.0%}")
        print(f"| {name} | {row['activations'] / 2**20:.0f} MiB | {row['activations'] / base['activations'] - 1:+.0%} "
              f"| {step_cells[0]} | {step_cells[1]} | {times[name]:.3f} s | {times[name] / times['none'] - 1:+.1%} |")

    # -- EMA ---------------------------------------------------------------------------------------
    ema = ModelEMA(model)
    ema.update(model)
    update = median_seconds(lambda: ema.update(model), device, max(args.reps, 5) * 4)
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"\nEMA update ({trained / 1e6:.1f}M averaged parameters, fused foreach lerp + copy of the rest): "
          f"{update * 1e3:.2f} ms = {update / times['none']:.2%} of a step ({times['none']:.3f} s)")

    # -- gradient accumulation --------------------------------------------------------------------
    k = args.accumulate
    micro = [make_batch(args.batch, args.size, device, seed=s) for s in range(k)]

    def naive_accumulation():
        """What accumulating costs without this project's bookkeeping: k forward / backward passes,
        each micro-batch's loss divided by its own counts (inexact), one clipping + AdamW step."""
        optimizer.zero_grad(set_to_none=True)
        for images, masks, targets in micro:
            with autocast_context(device, args.amp):
                outputs = model(images, masks)
            scaler.scale(criterion.weighted_loss(criterion(outputs, targets)) / k).backward()
        scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_(model.parameters(), clip)
        scaler.step(optimizer)
        scaler.update()

    normalizers = median_seconds(lambda: step_normalizers(criterion, model, micro), device, 50)
    timed = time_round_robin({"naive": naive_accumulation, "train_step": lambda: step(micro)}, args.reps, 0, device)
    print(f"\naccumulation, {k} micro-batches per step: train_step {timed['train_step']:.3f} s, a naive loop "
          f"{timed['naive']:.3f} s ({timed['train_step'] / timed['naive'] - 1:+.1%}, within the noise of the "
          f"machine); what train_step adds, the normalisers from the targets: {normalizers * 1e6:.0f} us = "
          f"{normalizers / timed['train_step']:.4%} of the step")
    print(f"# load average at the end: {describe().rsplit('load average ', 1)[1]}")
    return {"rows": rows, "times": times, "ema": update / times["none"],
            "accumulation": timed["train_step"] / timed["naive"] - 1, "normalizers": normalizers}


if __name__ == "__main__":
    main()
