"""Inference speed of an exported detector: PyTorch eager, ONNX Runtime and ``torch.compile``, in one run.

    python benchmarks/export_speed.py                    # DETR-R50, plain and iRPE, 800 x 1066, batch 1
    python benchmarks/export_speed.py --reps 10 --rpe rpe-2.0-product-ctx-1-k rpe-2.0-euc-bias-0-qk
    python benchmarks/export_speed.py --backbone tiny --size 96 128 --reps 1    # a smoke run

For each model (plain DETR, then each iRPE spec in the encoder), the same weights run the same
padded batch three ways: eager (``torch.no_grad``, the compiled iRPE kernel), the ONNX file that
``detr_irpe.export`` writes, in onnxruntime with ``--threads`` intra-op threads (torch uses as
many), and ``torch.compile`` of the model (inductor; a failure is printed, not raised). The ways
are timed round-robin, ``--reps`` times after one warm-up each, and the medians compared.
Export and compilation times are printed too; they are not in the images/s.
"""
import argparse
import logging
import statistics
import tempfile
import time
from pathlib import Path

import onnxruntime
import torch

from detr_irpe.export import export_program, onnx_session, run_onnx, save_onnx
from detr_irpe.export.program import sample_inputs
from detr_irpe.models import build_detr
from machine import describe


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def runners(model, images, mask, threads: int, workdir: Path, name: str):
    """name -> (seconds to prepare, a function running one batch -> outputs dict), or name -> error."""
    found = {"eager": (0.0, lambda: model(images, mask))}
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    path, seconds = timed(lambda: save_onnx(export_program(model), workdir / f"{name}.onnx"))
    session = onnx_session(path, options=options)
    found["onnxruntime"] = (seconds, lambda: run_onnx(session, images, mask))
    try:
        compiled = torch.compile(model)
        _, seconds = timed(lambda: compiled(images, mask))  # compilation happens on the first call
        found["torch.compile"] = (seconds, lambda: compiled(images, mask))
    except Exception as e:  # inductor needs a C++ compiler; its errors have many classes
        found["torch.compile"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200]}"
    return found


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--rpe", nargs="*", default=["rpe-2.0-product-ctx-1-k"], help="iRPE specs besides plain")
    parser.add_argument("--size", type=int, nargs=2, default=[800, 1066], metavar=("H", "W"))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions per way (after 1 warm-up)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.getLogger("torch._dynamo").setLevel(logging.ERROR)  # one warning per graph break (the iRPE kernel call)
    images, mask = sample_inputs(args.batch, tuple(args.size), seed=0)
    print(f"# export speed: DETR-{args.backbone}, batch {args.batch} at {args.size[0]} x {args.size[1]}, "
          f"onnxruntime {onnxruntime.__version__}, {describe()}")
    print(f"# median of {args.reps} after 1 warm-up, ways timed round-robin; images/s (ratio to eager)\n")
    print("| model | eager img/s | onnxruntime img/s | torch.compile img/s | max abs diff ORT / compile | export s | compile s |")
    print("|---|---|---|---|---|---|---|")
    results = {}
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        for spec in [None] + list(args.rpe):
            torch.manual_seed(0)
            model = build_detr(backbone=args.backbone, backbone_weights="none", rpe=spec)[0].eval()
            for name, p in model.named_parameters():
                if "lookup_table" in name:
                    p.normal_(0, 0.5)
            name = spec or "plain"
            ways = runners(model, images, mask, args.threads, Path(tmp), name.replace(".", "_"))
            live = {way: fn for way, value in ways.items() if not isinstance(value, str) for fn in [value[1]]}
            outputs = {way: fn() for way, fn in live.items()}  # the warm-up
            diff = {way: max(float((out[k] - outputs["eager"][k]).abs().max()) for k in ("pred_logits", "pred_boxes"))
                    for way, out in outputs.items()}
            times = {way: [] for way in live}
            for _ in range(args.reps):
                for way, fn in live.items():
                    times[way].append(timed(fn)[1])
            rate = {way: args.batch / statistics.median(t) for way, t in times.items()}
            results[name] = rate

            def cell(way):
                if way not in rate:
                    return f"failed ({ways[way]})"
                return f"{rate[way]:.3f} ({rate[way] / rate['eager']:.2f}x)"

            compile_s = ways["torch.compile"][0] if "torch.compile" in rate else float("nan")
            diffs = " / ".join(f"{diff[way]:.1e}" if way in diff else "-" for way in ("onnxruntime", "torch.compile"))
            print(f"| {name} | {rate['eager']:.3f} | {cell('onnxruntime')} | {cell('torch.compile')} | {diffs} "
                  f"| {ways['onnxruntime'][0]:.0f} | {compile_s:.0f} |", flush=True)
    return results


if __name__ == "__main__":
    main()
