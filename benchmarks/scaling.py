"""How the cost of attention grows with the number of tokens L, with and without iRPE.

Times forward+backward and measures peak memory (as in ``attention.py``) of our attention
without iRPE and with ``rpe-2.0-product-ctx-1-k`` on square feature maps from 16x16 (L = 256)
to 64x64 (L = 4096), then fits ``cost ~ L^p`` by least squares on log-log axes and prints p.

    python benchmarks/scaling.py            # 16x16, 32x32, 48x48, 64x64; a few minutes on 2 CPU cores
    python benchmarks/scaling.py --quick    # 8x8 .. 24x24, seconds
    python benchmarks/scaling.py --sdpa     # also rpe_impl="sdpa" (full (B, H, L, L) mask), up to 48x48
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from typing import Dict, List, Sequence, Tuple

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from attention import (D_MODEL, HEADS, MHA, NONE, SDPA_REFERENCE, SPECS, Variant,  # noqa: E402
                       make_inputs, make_variants, peak_memory, step_fn, time_round_robin)
from machine import describe, load_average  # noqa: E402

CTX_K = SPECS[0]
SIDES = [16, 32, 48, 64]
QUICK_SIDES = [8, 16, 24]
SDPA_MAX_SIDE = 48  # the full-mask path needs several (B, H, L, L) tensors: 64x64 takes GBs


def loglog_slope(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Least-squares slope of log(y) against log(x)."""
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)


def measure(sides: Sequence[int], batch: int, variants: List[Variant], reps: int, warmup: int, device,
            memory: bool = True) -> Dict[str, List[Tuple[int, float, float]]]:
    """{variant: [(L, fwd+bwd seconds, peak bytes)]}."""
    results: Dict[str, List[Tuple[int, float, float]]] = {v.name: [] for v in variants}
    for side in sides:
        hw = (side, side)
        src, pos, mask = make_inputs(batch, hw, device)
        chosen = [v for v in variants if v.name != SDPA_REFERENCE or side <= SDPA_MAX_SIDE]
        steps = {v.name: step_fn(v, "fwd+bwd", src, pos, mask, hw) for v in chosen}
        t0 = time.perf_counter()
        times = time_round_robin(steps, reps, warmup, device)
        for name, run in steps.items():
            peak = peak_memory(run, device)[0] if memory else float("nan")
            results[name].append((side * side, times[name], peak))
        print(f"# {side}x{side} done in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return results


def format_results(results: Dict[str, List[Tuple[int, float, float]]], batch: int) -> str:
    lines = [f"| attention (B={batch}) | " + " | ".join(f"L={L}" for L, _, _ in results[NONE])
             + " | time exponent | time exponent, two largest L | memory exponent |",
             "|---|" + "---|" * (len(results[NONE]) + 3)]
    for name, rows in results.items():
        if not rows:
            continue
        cells = [f"{1e3 * t:.0f} ms, {m / 2 ** 20:.0f} MiB" for _, t, m in rows]
        cells += ["-"] * (len(results[NONE]) - len(rows))
        Ls = [L for L, _, _ in rows]
        ts = [t for _, t, _ in rows]
        t_exp = f"{loglog_slope(Ls, ts):.2f}" if len(rows) > 1 else "-"
        t_end = f"{loglog_slope(Ls[-2:], ts[-2:]):.2f}" if len(rows) > 1 else "-"
        mems = [m for _, _, m in rows]
        m_exp = f"{loglog_slope(Ls, mems):.2f}" if len(rows) > 1 and all(m > 0 for m in mems) else "-"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {t_exp} | {t_end} | {m_exp} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small maps, 2 repetitions")
    ap.add_argument("--sides", type=int, nargs="*", default=None, help="square map sides, e.g. 16 32 48 64")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--sdpa", action="store_true", help="also the row-chunked kernel and the full-mask SDPA path (up to 48x48)")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's default)")
    args = ap.parse_args(argv)
    sides = args.sides or (QUICK_SIDES if args.quick else SIDES)
    reps = args.reps or (2 if args.quick else 3)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"# scaling benchmark: {describe()}, device {device}")
    print(f"# d_model {D_MODEL}, {HEADS} heads, batch {args.batch}, fwd+bwd, median of {reps} after 1 warm-up")
    variants = [v for v in make_variants([CTX_K], 0.0, device, references=args.sdpa) if v.name != MHA]
    results = measure(sides, args.batch, variants, reps, 1, device, memory=not args.no_memory)
    print(f"# load average at the end: {load_average()}")
    print(format_results(results, args.batch))
    L = sides[-1] ** 2
    print(f"# not in the peaks: the bucket ids cached per feature-map size, L*L int64 "
          f"({L * L * 8 / 2 ** 20:.0f} MiB at L={L}), computed once and shared by all encoder layers")
    return results


if __name__ == "__main__":
    main()
