"""Smoke test: the benchmark scripts run in-process on tiny sizes and produce numbers."""
import math

from helpers import load_benchmark


def test_attention_benchmark_produces_numbers(capsys):
    bench = load_benchmark("attention")
    rows = bench.main(["--quick", "--config", "2x4x5", "--reps", "1", "--warmup", "0",
                       "--specs", "rpe-2.0-product-ctx-1-k", "rpe-2.0-cross-ctx-1-qk"])
    names = {r.variant for r in rows}
    assert names == {bench.MHA, bench.NONE, bench.SDPA_REFERENCE, bench.CHUNKED_REFERENCE, "rpe-2.0-product-ctx-1-k",
                     "rpe-2.0-cross-ctx-1-qk"}
    for r in rows:
        assert r.fwd_ms > 0 and r.fb_ms > 0 and math.isfinite(r.fb_ms)
        assert r.peak_mib > 0 and r.largest > 0
    out = capsys.readouterr().out
    assert "fwd+bwd / no-RPE" in out and "rpe-2.0-product-ctx-1-k fwd+bwd time" in out


def test_scaling_benchmark_fits_an_exponent(capsys):
    scaling = load_benchmark("scaling")
    results = scaling.main(["--sides", "3", "5", "--reps", "1", "--no-memory"])
    assert all(len(rows) == 2 and all(t > 0 for _, t, _ in rows) for rows in results.values())
    assert "time exponent" in capsys.readouterr().out
    assert abs(scaling.loglog_slope([1, 2, 4], [3, 12, 48]) - 2.0) < 1e-12


def test_end_to_end_benchmark_both_modes():
    bench = load_benchmark("end_to_end")
    small = ["--backbone", "tiny", "--size", "64", "96", "--reps", "1", "--device", "cpu"]
    alternating = bench.main(small)
    assert {("plain", "train"), ("irpe", "train"), ("plain", "infer"), ("irpe", "infer")} == set(alternating)
    assert all(t > 0 for t in alternating.values())
    alone = bench.main(small + ["--one-at-a-time"])
    assert set(alone) == {"plain", "irpe"} and all(t > 0 for t in alone.values())


def test_gpu_check_without_cuda_says_so_and_exits_0(capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert load_benchmark("gpu_check").main([]) == {}
    assert capsys.readouterr().out.startswith("gpu_check: no CUDA device here, nothing measured")
