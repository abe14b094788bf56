"""The Triton kernel of the iRPE attention (:mod:`detr_irpe.irpe.triton_kernel`, for GPUs), proven on a
machine without one.

* Numbers. Triton's interpreter runs the kernels on CPU tensors, but only when TRITON_INTERPRET=1
  is set before triton is imported, and pytest has imported it long before. So the fixture
  ``interpreted`` runs this file as a script in one subprocess: it computes every case of
  ``CASES`` (and the checks of bucket ids and dropout masks, test_activation_checkpointing.py's
  check with the kernel, and ``benchmarks/gpu_check.py --dry-run``: everything that needs the
  interpreter, in one process, as each costs seconds to start) and prints the results as JSON,
  and the tests assert on them. Each case compares the output and the gradients of q, k, v and every
  table with the naive float64 reference (``irpe_reference.attention_heads_ref``, autograd
  through it): every method x mode x shared / per-head table, each of q, k, v alone and all three, with a
  padded image, a sequence that ends inside a block, skip tokens, a 1-cell map, the largest
  bucket count the kernel accepts, head dims 32 and 64, float32 (1e-4 of the largest value),
  bfloat16 and float16 (loose, below), and dropout against the reference given the kernel's
  own mask.
* Ahead of time. The kernels compile for sm_80 and sm_90 with the ptxas bundled with triton,
  and each compiled kernel fits: shared memory within the block limit, registers within 255,
  (almost) no spills. A representative set here; every specialization the dispatch can launch
  in the slow test.
* What the kernel refuses, and that the package imports without triton.
"""
import contextlib
import importlib.util
import json
import math
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from detr_irpe.irpe import RPEConfig, RPEMultiheadAttention, triton_kernel
from detr_irpe.irpe.buckets import TABLE_METHODS, bucket_ids_2d
from irpe_reference import attention_heads_ref, attention_ref, bucket_ref
from helpers import LargestTensor, load_benchmark, randomize_tables

HERE = Path(__file__).resolve().parent
FLOAT32_TOLERANCE = 1e-4  # of the largest absolute value of each reference tensor
# Half precision: the reference gets the inputs, tables and output gradient as rounded for the
# kernel, so what is left is the kernel's own rounding: the weights rounded before their product
# with v, the logits' gradients before theirs with q and k, the output (8 bits in bfloat16, 11 in
# float16). Measured at most 0.9% and 0.13% (a bias table's gradient sums logits' gradients that
# nearly cancel: each query's sum to zero).
HALF_TOLERANCE = {"bfloat16": 2e-2, "float16": 3e-3}


# --------------------------------------------------------------------------------------------
# The cases (computed in the interpreter subprocess)
# --------------------------------------------------------------------------------------------

def case(method, mode="contextual", rpe_on="k", shared=True, hw=(3, 6), skip=0, dtype="float32", head_dim=32,
         ratio=None, dropout=0.0, rows=16, table_dtype=None, batch=2):
    """``(name, parameters)`` of one comparison; ``method=None``: attention without iRPE."""
    ratio = ratio if ratio is not None else (1.0 if method == "product" else 2.0)
    table_dtype = table_dtype or dtype
    spec = "plain" if method is None else f"{method}-{mode[:4]}-{int(shared)}-{rpe_on}-r{ratio}"
    name = f"{spec}-{batch}x{hw[0]}x{hw[1]}+{skip}-{dtype}-d{head_dim}-rows{rows}" + (f"-p{dropout}" if dropout else "")
    if table_dtype != dtype:
        name += f"-tables-{table_dtype}"
    return name, dict(method=method, mode=mode, rpe_on=rpe_on, shared=shared, hw=hw, skip=skip, dtype=dtype,
                      head_dim=head_dim, ratio=ratio, dropout=dropout, rows=rows, table_dtype=table_dtype, batch=batch)


# Every method x mode x shared, and for each method every term alone (q, k, v) and all three
# together: shared tables on a 3 x 6 map (18 tokens: blocks of 16 and 2), per-head tables on
# 4 x 4 with a skip token (17 tokens: 16 and 1). One image (with padded tokens) to halve the
# interpreter's time, as for the heaviest special cases and the half-precision ones; the others
# have two.
RPE_ON = {("bias", True): ("q",), ("bias", False): ("k",), ("contextual", True): ("k", "qkv"),
          ("contextual", False): ("q", "v")}
COMBOS = dict(
    case(method, mode, rpe_on, shared, *(((3, 6), 0) if shared else ((4, 4), 1)), batch=1)
    for method in ("euc", "quant", "cross", "product") for mode in ("bias", "contextual")
    for shared in (True, False) for rpe_on in RPE_ON[mode, shared]
)
SPECIAL = dict([
    case("product", rpe_on="qkv", shared=False, head_dim=64, batch=1),
    case("product", rpe_on="qkv", hw=(1, 1)),  # a 1-cell map: one token
    case("euc", "bias", "qk", shared=False, hw=(1, 1), skip=2),  # one image token, two skip tokens
    case("product", rpe_on="qkv", shared=False, skip=1, ratio=7.5, batch=1),  # 31^2 + 1 = 962 buckets, the most accepted
    case("euc", "bias", "qk", ratio=100.0, batch=1),  # the largest ratio the spec allows: 401 buckets
    case("product", rpe_on="k", hw=(5, 7), rows=None),  # the default block (32): 35 tokens, blocks of 32 and 3
    case(None),  # no iRPE
])
HALF = dict([  # one image each: the batch offsets do not depend on the dtype (checked above, in float32)
    case("product", rpe_on="qkv", shared=False, skip=1, dtype="bfloat16", table_dtype="float32", batch=1),
    case("cross", "bias", "qk", hw=(4, 4), dtype="bfloat16", batch=1),
    case("euc", rpe_on="kv", shared=False, dtype="float16", batch=1),
    case("quant", rpe_on="qkv", dtype="bfloat16", dropout=0.2, batch=1),
])
DROPOUT = dict([
    case("product", rpe_on="qkv", shared=False, skip=1, dropout=0.3),
    case("cross", "bias", "qk", dropout=0.3),
    case(None, dropout=0.3),
])
CASES = {**COMBOS, **SPECIAL, **HALF, **DROPOUT}


def build(params):
    """The float64 attention layer holding the case's (random) tables, its q, k, v ``(B, H, L, D)``
    and its key padding mask (the last image's last 3 tokens padded, unless that is every token)."""
    heads, head_dim, hw, skip, batch = 2, params["head_dim"], params["hw"], params["skip"], params["batch"]
    cfg = None
    if params["method"] is not None:
        cfg = RPEConfig(ratio=params["ratio"], method=params["method"], mode=params["mode"],
                        shared_head=params["shared"], rpe_on=params["rpe_on"], skip=skip)
    attn = RPEMultiheadAttention(heads * head_dim, heads, rpe=cfg).double()
    randomize_tables(attn, torch.Generator().manual_seed(1))
    L = skip + hw[0] * hw[1]
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(batch, heads, L, head_dim, generator=g, dtype=torch.float64) for _ in range(3))
    kpm = torch.zeros(batch, L, dtype=torch.bool)
    kpm[-1, -3:] = L > 3
    return attn, (q, k, v), kpm


def relative_error(got, want) -> float:
    """Largest error relative to the largest reference value (at least 0.01: a gradient that is
    zero, as those of q and k with a single key, is compared absolutely)."""
    got, want = got.detach().double(), want.detach()
    return float((got - want).abs().max() / want.abs().max().clamp(min=1e-2))


def run_case(params) -> dict:
    """Output and gradients of the kernel against the float64 reference: relative errors, and the
    dtypes of the gradients (the inputs' and the tables')."""
    attn, qkv, kpm = build(params)
    dtype, table_dtype = getattr(torch, params["dtype"]), getattr(torch, params["table_dtype"])
    hw, skip, p = params["hw"], params["skip"], params["dropout"]
    B, H, L, D = qkv[0].shape
    tables = list(attn.rpe_tables())
    get_ids, grid = attn._bucket_lookup(hw, L, "cpu") if tables else (None, None)
    seed = 1234 + L
    plan = triton_kernel.make_plan(tables, get_ids, grid, skip, qkv[0].shape, D ** -0.5,
                                   kpm.view(B, 1, 1, L), p, seed, params["rows"])
    inputs = [x.to(dtype).requires_grad_() for x in qkv]
    weights = [t.lookup_table.detach().to(table_dtype).requires_grad_() for _, t in tables]
    out = triton_kernel.run(plan, *inputs, weights)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(dtype)
    got = torch.autograd.grad(out, inputs + weights, grad)
    mask = triton_kernel.dropout_mask(p, seed, B, H, L).double() if p > 0 else None
    with torch.no_grad():  # the reference starts from the values the kernel got (rounded in half precision)
        for (_, table), weight in zip(tables, weights):
            table.lookup_table.copy_(weight)
    ref_inputs = [x.detach().double().requires_grad_() for x in inputs]
    want_out = attention_heads_ref(attn, *ref_inputs, kpm, hw, dropout_mask=mask)
    want = torch.autograd.grad(want_out, ref_inputs + [t.lookup_table for _, t in tables], grad.double())
    names = ["q", "k", "v"] + [f"table {i} ({w}, {t.method})" for i, (w, t) in enumerate(tables)]
    errors = {"out": relative_error(out, want_out)}
    errors.update({n: relative_error(g, w) for n, g, w in zip(names, got, want)})
    dtypes_kept = out.dtype == dtype and all(g.dtype == x.dtype for g, x in zip(got, inputs + weights))
    result = {"errors": errors, "dtypes_kept": dtypes_kept, "block": plan.rows}
    if mask is not None:
        result["dropped"] = float((mask == 0).double().mean())
    return result


def run_layer() -> dict:
    """The layer with ``rpe_impl="triton"``, end to end through its dispatch, in float32 against
    ``attention_ref`` in float64 (input, projections and tables); ``calls``: the kernel's runs."""
    hw, heads, channels = (4, 5), 2, 64
    L = hw[0] * hw[1]
    attn = RPEMultiheadAttention(channels, heads, rpe="rpe-2.0-product-ctx-0-qkv", rpe_impl="triton")
    randomize_tables(attn, torch.Generator().manual_seed(2))
    x = torch.randn(L, 2, channels, generator=torch.Generator().manual_seed(0))
    kpm = torch.zeros(2, L, dtype=torch.bool)
    kpm[1].view(hw)[:, -2:] = True
    x = x.requires_grad_()
    calls, run = [], triton_kernel.run
    triton_kernel.run = lambda *args: calls.append(1) or run(*args)
    try:
        out, _ = attn(x, x, x, key_padding_mask=kpm, hw=hw)
    finally:
        triton_kernel.run = run
    got = torch.autograd.grad(out.square().sum(), [x, *attn.parameters()])
    ref = attn.double()
    x64 = x.detach().double().requires_grad_()
    want_out, _ = attention_ref(ref, x64, kpm, hw)
    want = torch.autograd.grad(want_out.square().sum(), [x64, *ref.parameters()])
    names = ["out", "x"] + [n for n, _ in ref.named_parameters()]
    errors = {n: relative_error(g, w) for n, g, w in zip(names, [out, *got], [want_out, *want])}
    return {"calls": len(calls), "errors": errors}


def run_bucket_ids() -> list:
    """Pairs whose id in the kernels differs from :func:`bucket_ids_2d` (``b(i, j)``, and ``b(j, i)``
    for a term on queries): every table method, maps from 1 x 1 to 4 x 5, 0 to 2 skip tokens."""
    wrong = []
    for method in TABLE_METHODS:
        for hw in [(1, 1), (1, 4), (3, 1), (3, 5), (5, 4)]:
            for skip, ratio in [(0, 1.0), (1, 2.0), (2, 0.5)]:
                ids, n = bucket_ids_2d(method, *hw, ratio, skip)
                table = triton_kernel.offset_ids(ids, hw, skip)
                for query_side, want in [(False, ids), (True, ids.T)]:
                    got = triton_kernel.pair_ids(table, hw, skip, n - 1, query_side).long()
                    if not torch.equal(got, want):
                        wrong.append(f"{method} {hw} skip {skip} query side {query_side}: "
                                     f"{int((got != want).sum())} pairs")
    return wrong


def run_dropout_masks() -> dict:
    """Statistics of the kernels' masks: drop rate, correlation of neighbours, seeding."""
    p, L = 0.1, 64
    mask = triton_kernel.dropout_mask(p, 123, 1, 2, L).double()
    dropped = (mask == 0).double()
    return dict(
        values=sorted(set(mask.unique().tolist())), rate=float(dropped.mean()), n=dropped.numel(),
        next_key=float((dropped[..., 1:] * dropped[..., :-1]).mean()),
        next_query=float((dropped[..., 1:, :] * dropped[..., :-1, :]).mean()),
        next_head=float((dropped[:, 0] * dropped[:, 1]).mean()),
        same_seed=torch.equal(mask, triton_kernel.dropout_mask(p, 123, 1, 2, L).double()),
        other_seed=not torch.equal(mask, triton_kernel.dropout_mask(p, 124, 1, 2, L).double()),
        large_seed=float((triton_kernel.dropout_mask(0.5, 2 ** 62 + 7, 1, 1, 64) == 0).double().mean()),
    )


def run_largest_tensor() -> dict:
    """The largest tensor of forward and backward, in bytes (the kernels' own tiles are blocks)."""
    params = case("product", rpe_on="qkv", shared=False, hw=(6, 8), dropout=0.1)[1]
    attn, qkv, kpm = build(params)
    inputs = [x.float().requires_grad_() for x in qkv]
    tables = list(attn.rpe_tables())
    get_ids, grid = attn._bucket_lookup(params["hw"], 48, "cpu")
    with LargestTensor() as probe:
        plan = triton_kernel.make_plan(tables, get_ids, grid, 0, inputs[0].shape, 32 ** -0.5, kpm.view(2, 1, 1, 48),
                                       0.1, 5, 16)
        out = triton_kernel.run(plan, *inputs, [t.lookup_table.float() for _, t in tables])
        out.sum().backward()
    return dict(largest=probe.largest_bytes, buckets=tables[0][1].num_buckets, shape=list(inputs[0].shape))


def run_checkpointing() -> str:
    """test_activation_checkpointing's check with the kernel (float32, smaller images): ``"ok"``, or what failed."""
    from test_activation_checkpointing import check_checkpointed_gradients

    try:
        check_checkpointed_gradients("triton", sizes=((64, 96), (64, 64)))
    except AssertionError as e:
        return f"failed: {e}"
    return "ok"


def run_gpu_check() -> dict:
    """``benchmarks/gpu_check.py --dry-run`` (what it prints goes to stderr)."""
    with contextlib.redirect_stdout(sys.stderr):
        return load_benchmark("gpu_check").main(["--dry-run"])


def multiply_bfloat16_in_the_interpreter() -> None:
    """Triton's interpreter (3.8) multiplies bfloat16 tiles (``tl.dot``) as the uint16 bit patterns it
    stores them in. Where it does, widen them to float32 first: exact (a bfloat16 is the upper half
    of a float32), and what the tensor cores compute (exact products, float32 sums)."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    original = interpreter.InterpreterBuilder.create_dot
    one = interpreter.TensorHandle(np.array([[0x3F80]], dtype=np.uint16), tl.bfloat16)  # 1.0
    zero = interpreter.TensorHandle(np.zeros((1, 1), dtype=np.float32), tl.float32)
    if original(interpreter.interpreter_builder, one, one, zero, "tf32", 0).data[0, 0] == 1.0:
        return  # fixed upstream

    def widen(x):
        if x.dtype != tl.bfloat16:
            return x
        return interpreter.TensorHandle((x.data.astype(np.uint32) << 16).view(np.float32), tl.float32)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return original(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

    interpreter.InterpreterBuilder.create_dot = create_dot


def main() -> None:
    assert triton_kernel.INTERPRETED, "run with TRITON_INTERPRET=1"
    torch.set_num_threads(1)
    multiply_bfloat16_in_the_interpreter()
    report = dict(cases={name: run_case(params) for name, params in CASES.items()})
    for name, run in (("layer", run_layer), ("bucket_ids", run_bucket_ids), ("dropout_masks", run_dropout_masks),
                      ("largest_tensor", run_largest_tensor), ("checkpointing", run_checkpointing),
                      ("gpu_check", run_gpu_check)):
        report[name] = run()
    print(json.dumps(report))


# --------------------------------------------------------------------------------------------
# The interpreter's results
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def interpreted():
    """The JSON report of :func:`main`, run with TRITON_INTERPRET=1 in a subprocess."""
    if triton_kernel.IMPORT_ERROR is not None:
        pytest.skip(triton_kernel.IMPORT_ERROR)
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, __file__], capture_output=True, text=True, env=env, cwd=HERE, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def assert_close(errors: dict, tolerance: float, name: str) -> None:
    bad = {k: e for k, e in errors.items() if not e <= tolerance}  # `not <=`: NaN fails too
    assert not bad, f"{name}: relative errors above {tolerance:g}: {bad}"


@pytest.mark.parametrize("name", list(COMBOS) + list(SPECIAL))
def test_float32_matches_the_float64_reference_forward_and_backward(interpreted, name):
    result = interpreted["cases"][name]
    assert_close(result["errors"], FLOAT32_TOLERANCE, name)
    assert result["dtypes_kept"]


@pytest.mark.parametrize("name", list(HALF))
def test_half_precision_matches_the_float64_reference_loosely(interpreted, name):
    """bfloat16 / float16 inputs, float32 accumulation; outputs in the input dtype, the gradients of
    the tables in the tables' dtype (float32 tables with bfloat16 inputs, as under autocast)."""
    result = interpreted["cases"][name]
    assert_close(result["errors"], HALF_TOLERANCE[CASES[name]["dtype"]], name)
    assert result["dtypes_kept"]


@pytest.mark.parametrize("name", list(DROPOUT))
def test_dropout_matches_the_reference_given_the_kernels_mask(interpreted, name):
    """Dropout 0.3 in forward and the same mask in every backward kernel: the reference, given the
    mask of :func:`triton_kernel.dropout_mask`, agrees on the output and every gradient."""
    result = interpreted["cases"][name]
    assert 0.25 < result["dropped"] < 0.35
    assert_close(result["errors"], FLOAT32_TOLERANCE, name)


def test_dropout_masks_are_fair_independent_and_seeded(interpreted):
    stats = interpreted["dropout_masks"]
    p, n = 0.1, stats["n"]
    assert stats["values"] == [0.0, pytest.approx(1 / (1 - p))]
    assert abs(stats["rate"] - p) < 4 * math.sqrt(p * (1 - p) / n)
    for neighbours in ("next_key", "next_query", "next_head"):
        assert abs(stats[neighbours] - p * p) < 4 * math.sqrt(p * p * (1 - p * p) / (n / 2)), neighbours
    assert stats["same_seed"] and stats["other_seed"]
    assert abs(stats["large_seed"] - 0.5) < 0.05  # seeds of 63 bits, as the layer draws them


def test_the_layer_with_rpe_impl_triton_runs_the_kernel_and_matches_the_reference(interpreted):
    """``RPEMultiheadAttention(rpe_impl="triton")`` through its dispatch, in float32 against the
    float64 layer: output, input, projections and tables; the kernel ran (once per call)."""
    assert interpreted["layer"]["calls"] == 1
    assert_close(interpreted["layer"]["errors"], FLOAT32_TOLERANCE, "layer")


def test_kernel_bucket_ids_reproduce_bucket_ids_2d_exactly(interpreted):
    """Ids by offset plus the skip rule, computed inside a kernel as the attention kernels do, give
    every pair the id of :func:`bucket_ids_2d` (and its transpose on the query side)."""
    assert interpreted["bucket_ids"] == []


def test_no_batch_heads_length_squared_tensor_is_formed(interpreted):
    """Forward and backward (with dropout) stay at (B, H, L, max(D, buckets)) float32 tensors, below
    one (B, H, L, L) tensor (and the kernels hold one block of pairs at a time)."""
    found = interpreted["largest_tensor"]
    B, H, L, D = found["shape"]
    assert found["largest"] <= 4 * B * H * L * max(D, found["buckets"]) < 4 * B * H * L * L


def test_activation_checkpointing_recomputes_the_triton_kernels_masks(interpreted):
    """test_activation_checkpointing.py's check for ``rpe_impl="triton"``, run in the interpreter."""
    assert interpreted["checkpointing"] == "ok"


def test_gpu_check_dry_run_runs_every_section_through_the_interpreter(interpreted):
    """benchmarks/gpu_check.py --dry-run, so that the script a lent GPU runs cannot rot."""
    rows = interpreted["gpu_check"]["rows"]
    assert {r["section"] for r in rows} == {"a", "b", "c"}
    assert all(r["ok"] for r in rows if r["section"] == "a")  # triton == sdpa, outputs and every gradient
    assert all(r["ms"] and r["ms"] > 0 for r in rows if r["section"] != "a")


# --------------------------------------------------------------------------------------------
# Without the interpreter: bucket tables, refusals, imports
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", TABLE_METHODS)
def test_offset_table_holds_the_reference_bucket_of_every_offset(method):
    """:func:`offset_ids` against the loop-by-loop reference, on a map wider than tall, with skip tokens."""
    hw, skip, ratio = (4, 7), 2, 1.5
    table = triton_kernel.offset_ids(bucket_ids_2d(method, *hw, ratio, skip)[0], hw, skip)
    assert table.dtype == torch.int32 and table.shape == (2 * hw[0] - 1, 2 * hw[1] - 1)
    for dr in range(1 - hw[0], hw[0]):
        for dc in range(1 - hw[1], hw[1]):
            assert table[dr + hw[0] - 1, dc + hw[1] - 1] == bucket_ref(method, (dr, dc), (0, 0), ratio)


def test_what_the_kernel_refuses_and_why():
    product = RPEConfig(ratio=2.0, method="product")
    assert triton_kernel.represents(product, 32, 0.1) is None
    assert triton_kernel.represents(product, 64, 0.0) is None
    assert triton_kernel.represents(None, 32, 0.1) is None
    assert "head dims (32, 64)" in triton_kernel.represents(product, 16, 0.0)
    assert triton_kernel.represents(RPEConfig(ratio=7.5, method="product", skip=1), 32, 0.0) is None  # 962
    assert "1089 buckets" in triton_kernel.represents(RPEConfig(ratio=8.0, method="product"), 32, 0.0)
    assert triton_kernel.represents(RPEConfig(ratio=100.0, method="euc"), 32, 0.0) is None  # 401
    assert "dropout" in triton_kernel.represents(product, 32, 1.0)
    attn = RPEMultiheadAttention(48, 1, rpe=product)
    get_ids, grid = attn._bucket_lookup((2, 3), 6, "cpu")
    with pytest.raises(ValueError, match=r"rpe_impl='triton': head dim 48"):
        triton_kernel.make_plan(list(attn.rpe_tables()), get_ids, grid, 0, (1, 1, 6, 48), 0.1, None, 0.0, 0)


def test_run_names_what_is_missing():
    """Here (no GPU, no interpreter) the kernel is unavailable, and says how to get it; float64 is
    refused before anything runs."""
    q = torch.zeros(1, 1, 4, 32)
    plan = triton_kernel.make_plan([], None, None, 0, q.shape, 1.0, None, 0.0, 0)
    with pytest.raises(ValueError, match="float32, torch.float16, torch.bfloat16"):
        triton_kernel.run(plan, q.double(), q.double(), q.double(), [])
    if triton_kernel.IMPORT_ERROR is not None or triton_kernel.INTERPRETED:
        pytest.skip("triton is missing, or TRITON_INTERPRET=1 is set for the whole run")
    assert "TRITON_INTERPRET=1" in triton_kernel.available("cpu")
    if not torch.cuda.is_available():
        assert triton_kernel.available("cuda") == "no CUDA device is available"
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
            triton_kernel.run(plan, q, q, q, [])
    assert "CUDA devices, not mps" in triton_kernel.available("mps")


def test_the_package_imports_without_triton(monkeypatch):
    """The module (and so ``detr_irpe.irpe``) loads where triton is missing and says why it cannot run."""
    monkeypatch.setitem(sys.modules, "triton", None)  # `import triton` raises ImportError
    monkeypatch.setitem(sys.modules, "triton.language", None)
    path = Path(triton_kernel.__file__)
    spec = importlib.util.spec_from_file_location("detr_irpe.irpe._triton_kernel_without_triton", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.available("cuda").startswith("triton cannot be imported")
    assert module.represents(RPEConfig(), 32, 0.1) is None  # the decision needs no triton either


# --------------------------------------------------------------------------------------------
# Ahead-of-time compilation for sm_80 and sm_90
# --------------------------------------------------------------------------------------------

KERNELS = ("forward", "mass", "dq", "dkdv")
SIDES = ("", "q", "k", "v", "qk", "qv", "kv", "qkv")
# Shared memory one block may use (with the opt-in): A100 163 KB, H100 227 KB.
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
MAX_SPILL = 512  # bytes of stack per thread; measured: at most 344 (float32, head dim 64, dk/dv)


def specializations(blocks=triton_kernel.BLOCKS):
    """Every ``(kernel, dtype, head_dim, sides, dropout, block)`` the dispatch can launch (``mass`` only
    with an encoding on values; the forward and mass kernels do not depend on one)."""
    seen = set()
    for kernel in KERNELS:
        for sides in SIDES:
            if kernel == "mass" and "v" not in sides:
                continue
            key_sides = sides.replace("v", "") if kernel in ("forward", "mass") else sides
            for dtype in triton_kernel.DTYPES:
                for head_dim in triton_kernel.HEAD_DIMS:
                    for dropout in (False, True):
                        for block in blocks:
                            key = (kernel, key_sides, "v" in sides and kernel == "mass", dtype, head_dim, dropout,
                                   block)
                            if key not in seen:
                                seen.add(key)
                                yield kernel, dtype, head_dim, sides, dropout, block


def compile_for(arch: int, kernel: str, dtype, head_dim: int, sides: str, dropout: bool, block: int) -> dict:
    """Compile one specialization as a launch would, for ``sm_{arch}``; its resources from the cubin."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(triton_kernel, f"_{kernel}_kernel")
    types, attrs = triton_kernel.signature(fn, dtype, sides)
    flags = {k: v for k, v in triton_kernel.flags(dtype, head_dim, block, sides, dropout).items() if k in fn.arg_names}
    warps = triton_kernel.num_warps(dtype, head_dim)
    compiled = triton.compile(ASTSource(fn, types, flags, attrs), target=GPUTarget("cuda", arch, 32),
                              options=dict(num_warps=warps, num_stages=triton_kernel.NUM_STAGES))
    with tempfile.TemporaryDirectory() as folder:
        cubin = Path(folder) / "kernel.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        dump = subprocess.run([triton.knobs.nvidia.cuobjdump.path, "--dump-resource-usage", str(cubin)],
                              capture_output=True, text=True, check=True).stdout
    usage = {k: int(v) for k, v in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", dump)}
    return dict(shared=compiled.metadata.shared, registers=usage["REG"], spill=usage["STACK"] + usage["LOCAL"],
                warps=compiled.metadata.num_warps, expected_warps=warps)


def assert_fits(arch: int, found: dict, what: str) -> None:
    assert found["shared"] <= SHARED_LIMIT[arch], f"{what}: {found}"
    assert found["registers"] <= 255 and found["spill"] <= MAX_SPILL, f"{what}: {found}"
    assert found["warps"] == found["expected_warps"], f"{what}: {found}"


needs_compiler = pytest.mark.skipif(triton_kernel.IMPORT_ERROR is not None or triton_kernel.INTERPRETED,
                                    reason="needs triton's compiler (no TRITON_INTERPRET)")
# DETR's layer (product, contextual, on keys, head dim 32, float32, dropout 0.1 in training),
# the same in bfloat16, and the heaviest: every side in float32 with 64-channel heads.
REPRESENTATIVE = [
    *[(kernel, torch.float32, 32, "k", True, 32) for kernel in ("forward", "dq", "dkdv")],
    *[(kernel, torch.bfloat16, 32, "qkv", True, 32) for kernel in KERNELS],
    *[(kernel, torch.float32, 64, "qkv", True, 32) for kernel in KERNELS],
]


@needs_compiler
@pytest.mark.parametrize("arch", [80, 90])
def test_representative_specializations_compile_and_fit(arch):
    for spec in REPRESENTATIVE:
        assert_fits(arch, compile_for(arch, *spec), f"sm_{arch} {spec}")


@pytest.mark.slow  # about 600 compilations per architecture, several minutes (triton caches them after)
@needs_compiler
@pytest.mark.parametrize("arch", [80, 90])
def test_every_specialization_compiles_and_fits(arch):
    results = {spec: compile_for(arch, *spec) for spec in specializations()}
    worst = max(results.items(), key=lambda kv: kv[1]["spill"])
    print(f"sm_{arch}: {len(results)} specializations, most shared memory "
          f"{max(r['shared'] for r in results.values())} B, most spill {worst[1]['spill']} B ({worst[0]})")
    for spec, found in results.items():
        assert_fits(arch, found, f"sm_{arch} {spec}")


if __name__ == "__main__":  # the interpreter's side of the fixture `interpreted`
    main()
