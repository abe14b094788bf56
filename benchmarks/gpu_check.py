"""One command for a lent GPU: the fused Triton iRPE kernel checked against the SDPA path, then timed.

    python benchmarks/gpu_check.py                  # on a CUDA machine: under 8 minutes, one table + JSON
    python benchmarks/gpu_check.py --json gpu.json  # also write the JSON to a file
    python benchmarks/gpu_check.py --dry-run        # tiny sizes on the CPU through Triton's interpreter

(a) correctness: ``rpe_impl="triton"`` against ``rpe_impl="sdpa"`` (the iRPE logits as a dense mask)
    on the same weights and inputs: outputs and every gradient, fp32 and bf16;
(b) attention fwd+bwd time and peak memory at DETR-R50 (25x34, batch 2 and 8) and DC5 (50x84,
    batch 2) sizes: no-RPE SDPA, iRPE through SDPA's dense mask, iRPE through the Triton kernel;
(c) a DETR-R50 and an R50-DC5 training step (800 x 1066, batch 2): plain, iRPE via SDPA, iRPE via
    Triton, fp32 and ``--amp bf16``.

Without CUDA (and without ``--dry-run``) it says so in one line and exits 0. A case that runs out
of memory is reported as ``OOM``, not as a failure of the script.
"""
import os
import sys

if "--dry-run" in sys.argv:  # the interpreter must be chosen before triton (and torch) are imported
    os.environ["TRITON_INTERPRET"] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from typing import Callable, Dict, List, Optional, Tuple  # noqa: E402

import torch  # noqa: E402

from detr_irpe.config import TrainConfig  # noqa: E402
from detr_irpe.engine.optim import build_optimizer  # noqa: E402
from detr_irpe.engine.step import train_step  # noqa: E402
from detr_irpe.irpe import RPEMultiheadAttention  # noqa: E402
from detr_irpe.models import build_detr  # noqa: E402

SPEC = "rpe-2.0-product-ctx-1-k"  # the iRPE model zoo's
CHECK_SPECS = [SPEC, "rpe-2.0-product-bias-0-k", "rpe-2.0-euc-ctx-1-qkv", "rpe-2.0-cross-ctx-1-qk",
               "rpe-2.0-quant-bias-0-q"]
D_MODEL, HEADS = 256, 8
TOLERANCE = {torch.float32: 2e-3, torch.bfloat16: 5e-2}  # max |a - b| / max |b|, per tensor


class Sizes:
    """What each section runs: the full sizes on a GPU, tiny ones for a dry run."""

    def __init__(self, dry_run: bool):
        self.check = [(2, (5, 7))] if dry_run else [(2, (25, 34))]
        self.attention = ([("tiny", 2, (4, 5))] if dry_run else
                          [("R50", 2, (25, 34)), ("R50", 8, (25, 34)), ("DC5", 2, (50, 84))])
        self.training = ([("tiny", "tiny", False, (64, 96))] if dry_run else
                         [("R50", "resnet50", False, (800, 1066)), ("R50-DC5", "resnet50", True, (800, 1066))])
        # DETR's transformer on a GPU; a one-layer one of the same head dim (32) in a dry run
        self.transformer = (dict(hidden_dim=32, nheads=1, enc_layers=1, dec_layers=1, dim_feedforward=64)
                            if dry_run else {})
        self.batch = 2
        self.reps, self.warmup = (1, 0) if dry_run else (5, 2)
        self.d_model, self.heads = (32, 1) if dry_run else (D_MODEL, HEADS)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def attention(spec: Optional[str], impl: str, sizes: Sizes, device, dtype) -> RPEMultiheadAttention:
    torch.manual_seed(0)
    module = RPEMultiheadAttention(sizes.d_model, sizes.heads, rpe=spec, rpe_impl=impl)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # non-zero tables: a term at zero would check nothing
        for name, p in module.named_parameters():
            if "lookup_table" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return module.to(device=device, dtype=dtype)


def inputs(batch: int, hw: Tuple[int, int], d_model: int, device, dtype):
    """``src (L, B, C)`` requiring grad, ``pos``, and a key-padding mask padding every image but the first."""
    g = torch.Generator().manual_seed(2)
    H, W = hw
    src = torch.randn(H * W, batch, d_model, generator=g)
    pos = torch.randn(H * W, batch, d_model, generator=g)
    mask = torch.zeros(batch, H, W, dtype=torch.bool)
    for b in range(1, batch):
        mask[b, max(1, round(H * 0.75)):, :] = True
        mask[b, :, max(1, round(W * 0.8)):] = True
    return (src.to(device, dtype).requires_grad_(), pos.to(device, dtype), mask.flatten(1).to(device))


def forward_backward(module, src, pos, mask, hw) -> Dict[str, torch.Tensor]:
    """Output and the gradients of the input and of every parameter, for a fixed upstream gradient."""
    module.zero_grad(set_to_none=True)
    src.grad = None
    q = src + pos
    out = module(q, q, src, key_padding_mask=mask, hw=hw)[0]
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(out))
    grads = {"output": out.detach(), "grad input": src.grad.detach()}
    grads.update({f"grad {n}": p.grad.detach() for n, p in module.named_parameters() if p.grad is not None})
    return grads


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def check(sizes: Sizes, device) -> List[dict]:
    """(a) Triton against SDPA: the largest relative error over the output and all gradients.

    A dry run checks float32 only: triton 3.8's interpreter multiplies bfloat16 tiles as their raw
    bits (tests/test_irpe_triton.py works around it), so bf16 there would say nothing of the kernel."""
    rows = []
    for dtype in (torch.float32,) if device.type == "cpu" else (torch.float32, torch.bfloat16):
        for spec in CHECK_SPECS:
            for batch, hw in sizes.check:
                src, pos, mask = inputs(batch, hw, sizes.d_model, device, dtype)
                want = forward_backward(attention(spec, "sdpa", sizes, device, dtype), src, pos, mask, hw)
                got = forward_backward(attention(spec, "triton", sizes, device, dtype), src, pos, mask, hw)
                errors = {k: relative_error(got[k], want[k]) for k in want}
                worst = max(errors, key=errors.get)
                rows.append({"section": "a", "case": f"{spec} {str(dtype)[6:]} {batch}x{hw[0]}x{hw[1]}",
                             "max_rel_error": errors[worst], "worst": worst,
                             "ok": errors[worst] <= TOLERANCE[dtype]})
    return rows


def measure(fn: Callable[[], None], sizes: Sizes, device) -> Tuple[float, float]:
    """Median seconds of ``fn`` and its peak memory in MiB (CUDA; 0 on the CPU), or raises OOM."""
    for _ in range(sizes.warmup):
        fn()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    times = []
    for _ in range(sizes.reps):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    peak = (torch.cuda.max_memory_allocated(device) - base) / 2 ** 20 if device.type == "cuda" else 0.0
    return statistics.median(times), peak


def guarded(fn: Callable[[], Tuple[float, float]]) -> Tuple[Optional[float], Optional[float]]:
    try:
        return fn()
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return None, None


def attention_timings(sizes: Sizes, device) -> List[dict]:
    """(b) fwd+bwd time and peak memory of one encoder self-attention call."""
    rows = []
    for name, batch, hw in sizes.attention:
        variants = [("no RPE, SDPA", None, "sdpa"), ("iRPE, SDPA dense mask", SPEC, "sdpa"),
                    ("iRPE, triton", SPEC, "triton")]
        base = None
        for label, spec, impl in variants:
            module = attention(spec, impl, sizes, device, torch.float32).train()
            src, pos, mask = inputs(batch, hw, sizes.d_model, device, torch.float32)
            seconds, peak = guarded(lambda: measure(lambda: forward_backward(module, src, pos, mask, hw), sizes, device))
            base = seconds if spec is None else base
            rows.append({"section": "b", "case": f"{name} {batch}x{hw[0]}x{hw[1]}: {label}", "ms": _ms(seconds),
                         "peak_mib": peak, "x_no_rpe": seconds / base if seconds and base else None})
            del module
    return rows


def _ms(seconds: Optional[float]) -> Optional[float]:
    return None if seconds is None else 1e3 * seconds


def training_timings(sizes: Sizes, device) -> List[dict]:
    """(c) one DETR training step, plain and with iRPE (SDPA or Triton), fp32 and bf16 autocast."""
    rows = []
    for name, backbone, dc5, (h, w) in sizes.training:
        g = torch.Generator().manual_seed(0)
        images = torch.randn(sizes.batch, 3, h, w, generator=g).to(device)
        masks = torch.zeros(sizes.batch, h, w, dtype=torch.bool, device=device)
        targets = [{"labels": torch.randint(1, 91, (4,), generator=g).to(device),
                    "boxes": (torch.rand(4, 4, generator=g) * 0.4 + 0.2).to(device)} for _ in range(sizes.batch)]
        for amp in ("none", "bf16"):
            base = None
            for label, spec, impl in (("plain", None, "sdpa"), ("iRPE via SDPA", SPEC, "sdpa"),
                                      ("iRPE via triton", SPEC, "triton")):
                torch.manual_seed(0)
                model, criterion, _ = build_detr(backbone=backbone, backbone_weights="none", dilation=dc5, rpe=spec,
                                                 rpe_impl=impl, **sizes.transformer)
                model.to(device).train()
                criterion.to(device)
                optimizer = build_optimizer(model, TrainConfig())

                def one_step():
                    train_step(model, criterion, optimizer, (images, masks, targets), amp=amp,
                               clip_max_norm=TrainConfig.clip_max_norm)

                seconds, peak = guarded(lambda: measure(one_step, sizes, device))
                base = seconds if spec is None else base
                rows.append({"section": "c", "case": f"{name} batch {sizes.batch} {h}x{w} amp={amp}: {label}",
                             "ms": _ms(seconds), "peak_mib": peak,
                             "x_plain": seconds / base if seconds and base else None})
                del model, criterion, optimizer
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    return rows


def table(rows: List[dict]) -> str:
    def cell(value, fmt):
        return "OOM" if value is None else format(value, fmt)

    lines = []
    for row in rows:
        if row["section"] == "a":
            lines.append(f"(a) {row['case']:52s} max rel. error {row['max_rel_error']:.1e} ({row['worst']})"
                         f"  {'ok' if row['ok'] else 'FAIL'}")
        else:
            ratio = row.get("x_no_rpe", row.get("x_plain"))
            lines.append(f"({row['section']}) {row['case']:60s} {cell(row['ms'], '9.2f')} ms  "
                         f"{cell(row['peak_mib'], '8.0f')} MiB  "
                         f"{'' if ratio is None else f'{ratio:.2f}x'}")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU through Triton's interpreter")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--sections", default="abc", help="which of a, b, c to run (default all)")
    args = parser.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here, nothing measured (--dry-run runs the script on the CPU through "
              "Triton's interpreter)")
        return {}
    device = torch.device("cpu" if args.dry_run else "cuda")
    sizes = Sizes(args.dry_run)
    where = "CPU, Triton interpreter (dry run)" if args.dry_run else torch.cuda.get_device_name(device)
    print(f"# gpu_check: {where}, torch {torch.__version__}, iRPE {SPEC}", flush=True)
    start = time.perf_counter()
    rows: List[dict] = []
    for section, run in (("a", check), ("b", attention_timings), ("c", training_timings)):
        if section in args.sections:
            rows += run(sizes, device)
            print(table([r for r in rows if r["section"] == section]), flush=True)
    result = {"device": where, "torch": torch.__version__, "spec": SPEC, "seconds": time.perf_counter() - start,
              "rows": rows}
    print(json.dumps(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
