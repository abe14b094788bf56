"""Attention micro-benchmark at DETR encoder sizes: time and peak memory, with ratios from one run.

Compares, on the same inputs and machine:

* ``nn.MultiheadAttention`` called the way DETR's encoder calls it (``need_weights`` left at its
  default True, so it also averages attention weights that DETR throws away);
* ``RPEMultiheadAttention`` without iRPE (SDPA; on CPU with dropout the compiled kernel);
* ``RPEMultiheadAttention`` with iRPE specs (``rpe_impl="auto"``: on CPU the compiled kernel), and ``rpe-2.0-product-ctx-1-k`` once more
  with ``rpe_impl="chunked"`` (the PyTorch-ops kernel) and ``rpe_impl="sdpa"`` (the full
  ``(B, H, L, L)`` float mask given to SDPA) to show what each step buys.

Inputs are DETR-like: ``q = k = src + pos``, ``v = src`` of shape ``(L, B, 256)``, 8 heads, a
key-padding mask that pads all images but the first (as in a batch of differently sized images).

    python benchmarks/attention.py            # default sizes, a few minutes on a 2-core CPU
    python benchmarks/attention.py --quick    # smoke run, < 30 s
    python benchmarks/attention.py --full     # adds batch 8 at 34x50 and 64x64 maps
    python benchmarks/attention.py --device cuda
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

from detr_irpe.irpe import RPEMultiheadAttention
from machine import describe, load_average

D_MODEL, HEADS = 256, 8
SPECS = ["rpe-2.0-product-ctx-1-k", "rpe-2.0-product-bias-0-k", "rpe-2.0-product-ctx-1-qkv",
         "rpe-2.0-euc-ctx-0-k", "rpe-2.0-cross-ctx-1-qk"]
MHA, NONE = "nn.MultiheadAttention", "ours, no RPE"
SDPA_REFERENCE = "rpe-2.0-product-ctx-1-k [sdpa]"
CHUNKED_REFERENCE = "rpe-2.0-product-ctx-1-k [chunked]"


# ----------------------------------------------------------------------------- variants

@dataclass
class Variant:
    name: str
    module: nn.Module

    def __call__(self, src: Tensor, pos: Tensor, mask: Tensor, hw: Tuple[int, int]) -> Tensor:
        q = k = src + pos
        if isinstance(self.module, nn.MultiheadAttention):  # as DETR: need_weights left at True
            return self.module(q, k, value=src, attn_mask=None, key_padding_mask=mask)[0]
        return self.module(q, k, src, key_padding_mask=mask, hw=hw)[0]


def make_variants(specs: Sequence[str], dropout: float, device, references: bool = True) -> List[Variant]:
    """nn.MultiheadAttention, ours without iRPE, ours with each spec (and the [chunked] and [sdpa] references); same weights."""
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(D_MODEL, HEADS, dropout=dropout)
    variants = [Variant(MHA, mha), Variant(NONE, RPEMultiheadAttention(D_MODEL, HEADS, dropout))]
    for spec in specs:
        variants.append(Variant(spec, RPEMultiheadAttention(D_MODEL, HEADS, dropout, rpe=spec)))
    if references:
        for name, impl in ((CHUNKED_REFERENCE, "chunked"), (SDPA_REFERENCE, "sdpa")):
            variants.append(Variant(name, RPEMultiheadAttention(D_MODEL, HEADS, dropout, rpe=SPECS[0], rpe_impl=impl)))
    g = torch.Generator().manual_seed(1)
    for v in variants:
        if v.module is not mha:
            v.module.load_state_dict(mha.state_dict(), strict=False)
        with torch.no_grad():  # non-zero tables, so that no term is trivially zero
            for name, p in v.module.named_parameters():
                if "lookup_table" in name:
                    p.copy_(0.1 * torch.randn(p.shape, generator=g))
        v.module.to(device)
    return variants


def make_inputs(batch: int, hw: Tuple[int, int], device, seed: int = 0):
    """src, pos ``(L, B, 256)``, key-padding mask ``(B, L)`` (image b > 0 is smaller, padded right/bottom)."""
    g = torch.Generator().manual_seed(seed)
    H, W = hw
    L = H * W
    src = torch.randn(L, batch, D_MODEL, generator=g)
    pos = torch.randn(L, batch, D_MODEL, generator=g)
    mask = torch.zeros(batch, H, W, dtype=torch.bool)
    for b in range(1, batch):
        shrink = 0.6 + 0.4 * ((b * 7) % 5) / 5  # 0.6 .. 0.92 of each side is image
        mask[b, max(1, round(H * shrink)):, :] = True
        mask[b, :, max(1, round(W * shrink)):] = True
    return src.to(device), pos.to(device), mask.flatten(1).to(device)


# ----------------------------------------------------------------------------- one step

def step_fn(variant: Variant, mode: str, src: Tensor, pos: Tensor, mask: Tensor, hw) -> Callable[[], None]:
    """A closure running one forward (``fwd``: eval, no grad) or forward+backward (``fwd+bwd``: train)."""
    module = variant.module
    if mode == "fwd":
        def run():
            module.eval()
            with torch.no_grad():
                variant(src, pos, mask, hw)
        return run
    x = src.detach().clone().requires_grad_()
    grad = torch.randn_like(src)

    def run():
        module.train()
        x.grad = None
        for p in module.parameters():
            p.grad = None
        variant(x, pos, mask, hw).backward(grad)
    return run


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_round_robin(steps: Dict[str, Callable[[], None]], reps: int, warmup: int, device) -> Dict[str, float]:
    """Median seconds per step; repetitions interleave the variants so background load hits all alike."""
    for run in steps.values():
        for _ in range(warmup):
            run()
    times: Dict[str, List[float]] = {name: [] for name in steps}
    for _ in range(reps):
        for name, run in steps.items():
            _sync(device)
            t0 = time.perf_counter()
            run()
            _sync(device)
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


# ----------------------------------------------------------------------------- memory

class LargestTensor(TorchDispatchMode):
    """Largest tensor (in elements) any aten op outputs, forward and backward included."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def _cpu_peak_bytes(run: Callable[[], None]) -> int:
    """Peak of bytes held by the CPU allocator during ``run`` above what was held before it.

    torch.profiler(profile_memory=True) records every allocation and free the CPU allocator
    sees (kernel-internal scratch buffers included) with the running total; the peak is the
    largest running total. No allocator statistics are needed.
    """
    with tempfile.TemporaryDirectory() as tmp:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
            run()
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    events = [e["args"] for e in events if e.get("name") == "[memory]" and e["args"].get("Device Type", 0) == 0]
    if not events:
        return 0
    events.sort(key=lambda a: a.get("Ev Idx", 0))
    # the running total is kept across profiler sessions: measure from the one before the first event
    start = events[0]["Total Allocated"] - events[0]["Bytes"]
    return max(0, max(a["Total Allocated"] for a in events) - start)


def peak_memory(run: Callable[[], None], device) -> Tuple[int, int]:
    """(peak bytes above the start, largest single tensor in elements) of one step."""
    run()  # warm caches (bucket ids) so they are not counted
    with LargestTensor() as probe:
        run()
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base, probe.largest
    return _cpu_peak_bytes(run), probe.largest


# ----------------------------------------------------------------------------- tables

@dataclass
class Row:
    batch: int
    hw: Tuple[int, int]
    variant: str
    fwd_ms: float
    fb_ms: float
    peak_mib: float
    largest: int  # elements

    @property
    def L(self) -> int:
        return self.hw[0] * self.hw[1]


def run_config(batch: int, hw: Tuple[int, int], variants: List[Variant], reps: int, warmup: int,
               device, memory: bool = True) -> List[Row]:
    src, pos, mask = make_inputs(batch, hw, device)
    steps = {m: {v.name: step_fn(v, m, src, pos, mask, hw) for v in variants} for m in ("fwd", "fwd+bwd")}
    fwd = time_round_robin(steps["fwd"], reps, warmup, device)
    fb = time_round_robin(steps["fwd+bwd"], reps, warmup, device)
    rows = []
    for v in variants:
        peak, largest = peak_memory(steps["fwd+bwd"][v.name], device) if memory else (float("nan"), 0)
        rows.append(Row(batch, hw, v.name, 1e3 * fwd[v.name], 1e3 * fb[v.name], peak / 2 ** 20, largest))
    return rows


def format_table(rows: List[Row]) -> str:
    """Markdown table with ratios vs ours-without-RPE and vs nn.MultiheadAttention of the same size."""
    head = ("| B | map | L | attention | fwd ms | fwd+bwd ms | peak MiB (fwd+bwd) | largest tensor / BHL^2 "
            "| fwd+bwd / no-RPE | fwd+bwd / nn.MHA | peak / no-RPE |")
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        same = {x.variant: x for x in rows if x.batch == r.batch and x.hw == r.hw}
        base, mha = same.get(NONE), same.get(MHA)
        bhl2 = r.batch * HEADS * r.L * r.L
        lines.append(
            f"| {r.batch} | {r.hw[0]}x{r.hw[1]} | {r.L} | {r.variant} | {r.fwd_ms:.1f} | {r.fb_ms:.1f} "
            f"| {r.peak_mib:.1f} | {r.largest / bhl2:.2f} "
            f"| {_ratio(r.fb_ms, base and base.fb_ms)} | {_ratio(r.fb_ms, mha and mha.fb_ms)} "
            f"| {_ratio(r.peak_mib, base and base.peak_mib)} |")
    return "\n".join(lines)


def _ratio(a: float, b: Optional[float]) -> str:
    return f"{a / b:.2f}x" if b and not math.isnan(b) and not math.isnan(a) else "-"


GOALS = [  # (variant, metric, limit): fwd+bwd time or peak memory relative to ours without iRPE
    ("rpe-2.0-product-ctx-1-k", "time", 1.15), ("rpe-2.0-product-bias-0-k", "time", 1.10),
    ("rpe-2.0-product-ctx-1-qkv", "time", 2.0), ("rpe-2.0-product-ctx-1-k", "memory", 1.3),
    ("rpe-2.0-product-bias-0-k", "memory", 1.3), ("rpe-2.0-product-ctx-1-qkv", "memory", 1.3),
]


def format_goals(rows: List[Row]) -> str:
    lines = ["| B | map | goal | measured | met |", "|---|---|---|---|---|"]
    for batch, hw in dict.fromkeys((r.batch, r.hw) for r in rows):
        same = {r.variant: r for r in rows if r.batch == batch and r.hw == hw}
        base, mha = same.get(NONE), same.get(MHA)
        if base is None:
            continue
        for name, metric, limit in GOALS:
            if name not in same:
                continue
            value = same[name].fb_ms / base.fb_ms if metric == "time" else same[name].peak_mib / base.peak_mib
            if math.isnan(value):
                continue
            what = "fwd+bwd time" if metric == "time" else "peak memory"
            lines.append(f"| {batch} | {hw[0]}x{hw[1]} | {name} {what} <= {limit}x no-RPE | {value:.2f}x "
                         f"| {'yes' if value <= limit else 'NO'} |")
        if mha is not None:
            for metric in ("fwd", "fb"):
                a, b = getattr(base, f"{metric}_ms"), getattr(mha, f"{metric}_ms")
                what = "fwd" if metric == "fwd" else "fwd+bwd"
                lines.append(f"| {batch} | {hw[0]}x{hw[1]} | no-RPE {what} <= nn.MultiheadAttention | "
                             f"{a / b:.2f}x | {'yes' if a <= b else 'NO'} |")
        for r in same.values():
            if r.variant not in (MHA, SDPA_REFERENCE) and r.largest >= r.L * r.L * D_MODEL // HEADS:
                lines.append(f"| {batch} | {hw[0]}x{hw[1]} | {r.variant}: no tensor of L*L*head_dim | "
                             f"{r.largest} elements | NO |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- CLI

DEFAULT_CONFIGS = [(2, (25, 34)), (2, (34, 50)), (8, (25, 34))]
FULL_CONFIGS = DEFAULT_CONFIGS + [(8, (34, 50)), (2, (64, 64))]
QUICK_CONFIGS = [(2, (25, 34))]


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="one small configuration, few repetitions (< 30 s)")
    size.add_argument("--full", action="store_true", help="also batch 8 at 34x50 and batch 2 at 64x64")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--config", action="append", default=None, metavar="BxHxW",
                    help="replace the sizes, e.g. --config 2x25x34 (repeatable)")
    ap.add_argument("--specs", nargs="*", default=SPECS, help="iRPE specs to time")
    ap.add_argument("--dropout", type=float, default=0.0,
                    help="attention dropout in the fwd+bwd (training) step; DETR trains with 0.1")
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions (median reported)")
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory pass")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's default)")
    ap.add_argument("--json", default=None, help="also write the rows to this JSON file")
    return ap.parse_args(argv)


def main(argv=None) -> List[Row]:
    args = parse_args(argv)
    if args.config:
        configs = [(int(b), (int(h), int(w))) for b, h, w in (c.lower().split("x") for c in args.config)]
    else:
        configs = QUICK_CONFIGS if args.quick else FULL_CONFIGS if args.full else DEFAULT_CONFIGS
    reps = args.reps or (2 if args.quick else 5)
    warmup = args.warmup if args.warmup is not None else 1 if args.quick else 2
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"# attention benchmark: {describe()}, device {device}")
    print(f"# d_model {D_MODEL}, {HEADS} heads, dropout {args.dropout} in fwd+bwd, "
          f"median of {reps} after {warmup} warm-up")
    variants = make_variants(args.specs, args.dropout, device)
    rows: List[Row] = []
    for batch, hw in configs:
        t0 = time.perf_counter()
        rows += run_config(batch, hw, variants, reps, warmup, device, memory=not args.no_memory)
        print(f"# B={batch} {hw[0]}x{hw[1]} done in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    print(f"# load average at the end: {load_average()} (other processes on the machine distort timings)")
    print(format_table(rows))
    print()
    print(format_goals(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([r.__dict__ for r in rows], f, indent=1)
    return rows


if __name__ == "__main__":
    main()
