"""The compiled CPU kernel (``rpe_impl="native"``, the CPU default): float32 at DETR size
against the float64 reference, and how the attention picks it or falls back to the row-chunked
kernel. Its float64 comparison with the reference for every combination is in
test_irpe_fastpaths.py, shared with the row-chunked kernel.

The kernel is built on first use (about half a minute here); every test in this file needs it,
so a machine without a compiler fails here rather than skipping.
"""

import os
import subprocess
import sys

import pytest
import torch

from detr_irpe.irpe import RPEConfig, RPEMultiheadAttention, as_rpe_config, chunked, native, parse_rpe_spec
from detr_irpe.irpe.attention import choose_impl
from detr_irpe.irpe.spec import MAX_RATIO
from irpe_reference import attention_ref
from helpers import REPO
from test_irpe_attention import randomize_tables


@pytest.fixture(scope="module", autouse=True)
def kernel():
    module = native.load()
    assert module is not None, native.unavailable_reason()
    return module


# Float32 takes code paths float64 does not: the vectorised exp and its partial last vector (rows
# of 850, 238 and 306 keys end 2, 14 and 2 keys into a vector), and on AVX-512 machines the
# permute gathers (tables of up to 16 / 32 values: 9 and 17 column buckets for product and cross
# at ratio 2.0 and 4.0, 9 and 17 buckets for euc and quant) with the scalar gather beyond (33
# buckets, euc at ratio 8.0). DETR's 25x34 map once; narrower maps of the same width after.
@pytest.mark.parametrize("spec, hw", [
    ("rpe-2.0-product-ctx-1-k", (25, 34)),
    ("rpe-2.0-euc-bias-0-qk", (7, 34)),
    ("rpe-2.0-cross-ctx-1-qkv", (9, 34)),
    ("rpe-2.0-product-bias-1-qk", (19, 16)),
    ("rpe-2.0-product-ctx-0-v", (6, 16)),
    ("rpe-4.0-product-ctx-1-k", (12, 37)),
    ("rpe-4.0-euc-ctx-0-qv", (9, 40)),
    ("rpe-2.0-quant-ctx-1-k", (11, 7)),
    ("rpe-8.0-euc-bias-0-k", (6, 9)),
])
def test_float32_matches_float64_reference(spec, hw):
    """A feature map with a padded image, the float32 kernel (polynomial exp, blocks of many
    rows, several threads) against the float64 reference."""
    torch.manual_seed(0)
    heads, channels = 2, 32
    L = hw[0] * hw[1]
    attn = RPEMultiheadAttention(channels, heads, rpe=spec, rpe_impl="native").eval()
    randomize_tables(attn, torch.Generator().manual_seed(2))
    x = torch.randn(L, 2, channels)
    kpm = torch.zeros(2, L, dtype=torch.bool)
    kpm[1].view(hw)[:, hw[1] * 7 // 8:] = True
    kpm[1].view(hw)[hw[0] * 4 // 5:] = True
    x = x.requires_grad_()
    out, _ = attn(x, x, x, key_padding_mask=kpm, hw=hw)
    got = torch.autograd.grad(out.square().sum(), [x, *attn.parameters()])
    ref = attn.double()
    x64 = x.detach().double().requires_grad_()
    ref_out, _ = attention_ref(ref, x64, kpm, hw)
    want = torch.autograd.grad(ref_out.square().sum(), [x64, *ref.parameters()])
    torch.testing.assert_close(out.double(), ref_out, rtol=1e-4, atol=1e-5)
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, rtol=1e-3, atol=1e-4)


# choose_impl's truth table, row by row (see its docstring): (rpe_impl, iRPE spec, device, dtype,
# dropout, need_weights, attn_mask, kernel available, tracing) -> result or the exception raised.
K, F32, F64 = "rpe-2.0-product-ctx-1-k", torch.float32, torch.float64
BIG = "rpe-45.5-product-ctx-1-k"  # 183^2 = 33,489 buckets: more than int16 ids hold
DISPATCH = [
    ("native", K, "cpu", F32, 0.0, False, False, True, "export", "export"),
    ("chunked", K, "cuda", F64, 0.1, True, True, False, "export", "export"),
    ("auto", None, "cpu", F32, 0.1, False, False, True, "export", "export"),
    ("auto", K, "cpu", F32, 0.0, False, False, True, "torchscript", RuntimeError),
    ("sdpa", K, "cuda", F32, 0.0, True, False, True, "torchscript", RuntimeError),
    ("auto", None, "cpu", F32, 0.0, False, False, True, "torchscript", "sdpa"),
    ("auto", K, "cpu", F32, 0.0, True, False, True, "", "sdpa"),
    ("native", K, "cpu", F32, 0.0, False, True, True, "", "sdpa"),
    ("auto", K, "cpu", torch.bfloat16, 0.0, False, False, True, "", "sdpa"),
    ("sdpa", K, "cpu", F32, 0.1, False, False, True, "", "sdpa"),
    ("auto", None, "cpu", F32, 0.1, False, False, True, "", "native"),
    ("native", None, "cpu", F64, 0.1, False, False, True, "", "native"),
    ("auto", None, "cpu", F32, 0.0, False, False, True, "", "sdpa"),
    ("auto", None, "cuda", F32, 0.1, False, False, True, "", "sdpa"),
    ("native", None, "cpu", F32, 0.1, False, False, False, "", "sdpa"),
    ("chunked", None, "cpu", F32, 0.1, False, False, True, "", "sdpa"),
    ("chunked", K, "cpu", F32, 0.0, False, False, True, "", "chunked"),
    ("chunked", K, "cuda", F32, 0.0, False, False, True, "", "chunked"),
    ("auto", K, "cuda", F32, 0.1, False, False, True, "", "sdpa"),
    ("native", K, "cuda", F32, 0.0, False, False, True, "", ValueError),
    ("auto", K, "cpu", F32, 0.0, False, False, True, "", "native"),
    ("native", K, "cpu", F64, 0.1, False, False, True, "", "native"),
    ("native", BIG, "cpu", F32, 0.0, False, False, True, "", ValueError),
    ("native", K, "cpu", F32, 0.0, False, False, False, "", RuntimeError),
    ("auto", K, "cpu", F32, 0.0, False, False, False, "", "chunked"),
    ("auto", BIG, "cpu", F32, 0.0, False, False, True, "", "chunked"),
]


@pytest.mark.parametrize("impl, spec, device, dtype, dropout, weights, mask, available, tracing, want", DISPATCH)
def test_choose_impl_truth_table(impl, spec, device, dtype, dropout, weights, mask, available, tracing, want):
    asked = []

    def kernel_available():
        asked.append(True)
        return available

    args = (impl, as_rpe_config(spec), device, dtype, dropout, True, weights, mask, kernel_available, tracing)
    if isinstance(want, type):
        with pytest.raises(want, match="torch.jit.trace" if tracing else "rpe_impl='native'"):
            choose_impl(*args)
    else:
        assert choose_impl(*args) == want
    if device != "cpu" or tracing:  # the CPU kernel is never built for another device, nor for a trace
        assert not asked


# the rows of rpe_impl="triton" (and auto beside it): (rpe_impl, spec, device, dtype, need_weights, tracing,
# why the Triton kernel cannot serve the call or None) -> result or the exception raised
BF16 = torch.bfloat16
TRITON_DISPATCH = [
    ("triton", K, "cuda", F32, False, "export", None, "export"),
    ("triton", K, "cuda", F32, True, "", None, "sdpa"),
    ("triton", None, "cuda", F32, False, "", None, "sdpa"),
    ("triton", K, "cuda", BF16, False, "", None, "triton"),
    ("triton", K, "cpu", F32, False, "", None, "triton"),  # the interpreter (TRITON_INTERPRET=1)
    ("triton", K, "cpu", F32, False, "", "triton's interpreter is off", RuntimeError),
    ("auto", K, "cuda", BF16, False, "", None, "sdpa"),  # auto keeps SDPA until triton is measured on a GPU
    ("auto", K, "cuda", F32, False, "", None, "sdpa"),
]


@pytest.mark.parametrize("impl, spec, device, dtype, weights, tracing, refusal, want", TRITON_DISPATCH)
def test_choose_impl_rows_of_the_triton_kernel(impl, spec, device, dtype, weights, tracing, refusal, want):
    args = (impl, as_rpe_config(spec), device, dtype, 0.1, True, weights, False, lambda: True, tracing)
    if isinstance(want, type):
        with pytest.raises(want, match=f"rpe_impl='triton' cannot serve this call: {refusal}"):
            choose_impl(*args, triton_refusal=lambda: refusal)
    else:
        assert choose_impl(*args, triton_refusal=lambda: refusal) == want


def test_the_triton_kernel_names_why_it_cannot_serve_a_call():
    from detr_irpe.irpe.attention import triton_refusal

    cfg = as_rpe_config(K)
    assert "float64" in triton_refusal(cfg, "cuda", F64, 32, 0.0)
    assert triton_refusal(cfg, "cpu", F32, 32, 0.0) is not None  # no interpreter in this process
    attn = RPEMultiheadAttention(16, 2, rpe=K, rpe_impl="triton")
    x = torch.randn(6, 1, 16)
    with pytest.raises(RuntimeError, match="rpe_impl='triton' cannot serve this call"):
        attn(x, x, x, hw=(2, 3))


def test_choose_impl_without_irpe_needs_self_attention():
    assert choose_impl("auto", None, "cpu", F32, 0.1, False, False, False, lambda: True) == "sdpa"


def test_representable_configurations_end_at_int16():
    assert native.represents(parse_rpe_spec("rpe-45.4-product-ctx-1-k"))  # 181^2 = 32,761 buckets
    assert not native.represents(parse_rpe_spec(BIG))
    assert native.represents(parse_rpe_spec(f"rpe-{MAX_RATIO}-euc-ctx-1-k"))  # 401 buckets
    assert native.represents(RPEConfig(ratio=45.4, method="product", skip=1))  # 32,762 with the skip bucket


def spy_on_kernels(monkeypatch) -> list:
    """Records ``(kernel, dropout)`` of every call of the native and chunked kernels."""
    calls = []
    for name, module in (("chunked", chunked), ("native", native)):
        def run(plan, *args, _name=name, _run=module.run):
            calls.append((_name, plan.dropout))
            return _run(plan, *args)

        monkeypatch.setattr(module, "run", run)
    return calls


def test_training_with_dropout_and_eval_both_use_native(monkeypatch):
    calls = spy_on_kernels(monkeypatch)
    attn = RPEMultiheadAttention(16, 2, dropout=0.1, rpe="rpe-2.0-product-ctx-1-k")
    x = torch.randn(12, 1, 16)
    attn.train()(x, x, x, hw=(3, 4))
    attn.eval()(x, x, x, hw=(3, 4))
    assert calls == [("native", 0.1), ("native", 0.0)]
    # without iRPE only training with dropout (where SDPA would form the full weights on CPU)
    calls.clear()
    plain = RPEMultiheadAttention(16, 2, dropout=0.1)
    plain.train()(x, x, x)
    plain.eval()(x, x, x)
    RPEMultiheadAttention(16, 2, dropout=0.1, rpe_impl="sdpa").train()(x, x, x)
    assert calls == [("native", 0.1)]


@pytest.mark.parametrize("spec", ["rpe-2.0-product-ctx-1-qkv", "rpe-1.0-euc-bias-0-qk", "rpe-2.0-cross-ctx-1-kv", None])
def test_dropout_matches_float64_reference_with_the_kernels_masks(kernel, spec):
    """Forward and every gradient with dropout 0.3 against the naive reference given the masks
    the kernel draws (its dropout_mask): dropout acts on the weights before the values and their
    iRPE term, and backward redraws exactly forward's masks."""
    torch.manual_seed(0)
    hw, heads, channels, p = (5, 7), 2, 16, 0.3
    L = hw[0] * hw[1]
    attn = RPEMultiheadAttention(channels, heads, dropout=p, rpe=spec, rpe_impl="native").double().train()
    attn.chunk_rows = 4  # several blocks per head
    if spec is not None:
        randomize_tables(attn, torch.Generator().manual_seed(2))
    x = torch.randn(L, 2, channels, dtype=torch.float64, requires_grad=True)
    kpm = torch.zeros(2, L, dtype=torch.bool)
    kpm[1, -9:] = True
    torch.manual_seed(5)
    seed = int(torch.randint(0, 2 ** 62, ()))  # the seed the layer draws after the same reset
    torch.manual_seed(5)
    out, _ = attn(x, x, x, key_padding_mask=kpm, hw=hw)
    got = torch.autograd.grad(out.square().sum(), [x, *attn.parameters()])
    mask = kernel.dropout_mask(p, seed, 2 * heads * L, L).view(2, heads, L, L)
    assert 0.2 < (mask == 0).double().mean() < 0.4 and set(mask.unique().tolist()) == {0.0, 1 / (1 - p)}
    ref_out, _ = attention_ref(attn, x, kpm, hw, dropout_mask=mask)
    want = torch.autograd.grad(ref_out.square().sum(), [x, *attn.parameters()])
    torch.testing.assert_close(out, ref_out, rtol=1e-9, atol=1e-12)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-11)


def test_dropout_masks_are_fair_independent_and_seeded(kernel):
    """Drop rate within 4 sigma of p, no correlation between neighbouring keys or rows, the same
    masks for the same seed, and others for another seed; float32 and float64 kernels agree."""
    p, rows, L = 0.1, 512, 850
    mask = kernel.dropout_mask(p, 123, rows, L)
    dropped = (mask == 0).double()
    n = rows * L
    assert abs(dropped.mean() - p) < 4 * (p * (1 - p) / n) ** 0.5
    for a, b in [(dropped[:, 1:], dropped[:, :-1]), (dropped[1:], dropped[:-1])]:  # neighbouring keys, rows
        both = (a * b).mean()
        assert abs(both - p * p) < 4 * (p * p * (1 - p * p) / a.numel()) ** 0.5
    assert torch.equal(mask, kernel.dropout_mask(p, 123, rows, L))
    assert not torch.equal(mask, kernel.dropout_mask(p, 124, rows, L))
    # the float32 kernel applies the same masks: with v = one-hot keys the output rows are the weights
    torch.manual_seed(0)
    q = torch.zeros(1, 1, 40, 40)
    v = torch.eye(40).view(1, 1, 40, 40)
    for dtype in (torch.float32, torch.float64):
        out, _ = kernel.forward(q.to(dtype), q.to(dtype), v.to(dtype), 1.0, torch.empty(0, dtype=torch.bool), [], 8,
                                0.5, 99)
        torch.testing.assert_close(out.double().view(40, 40), kernel.dropout_mask(0.5, 99, 40, 40) / 40)


def test_fallback_when_the_kernel_cannot_be_built(monkeypatch):
    """A failed build warns once, names the cause and what to install; auto falls back, native refuses."""
    from torch.utils import cpp_extension

    def broken(*args, **kwargs):
        raise RuntimeError("Ninja is required to load C++ extensions")

    monkeypatch.setattr(cpp_extension, "load", broken)
    monkeypatch.setattr(native._State, "tried", False)
    monkeypatch.setattr(native._State, "module", None)
    monkeypatch.setattr(native._State, "error", None)
    with pytest.warns(RuntimeWarning, match=r"could not build the fused iRPE CPU kernel.*Ninja is required.*pip install ninja"):
        assert native.load() is None
    assert "Ninja is required" in native.unavailable_reason()
    calls = spy_on_kernels(monkeypatch)
    auto = RPEMultiheadAttention(16, 2, rpe="rpe-2.0-product-ctx-1-k")
    x = torch.randn(12, 1, 16)
    auto(x, x, x, hw=(3, 4))
    assert calls == [("chunked", 0.0)]
    strict = RPEMultiheadAttention(16, 2, rpe="rpe-2.0-product-ctx-1-k", rpe_impl="native")
    with pytest.raises(RuntimeError, match=r"rpe_impl='native'.*unavailable.*Ninja is required.*rpe_impl='auto'"):
        strict(x, x, x, hw=(3, 4))


BUILDING, BUILT = "building the iRPE CPU kernel", "the iRPE CPU kernel built in"
BUILD_AHEAD = "from detr_irpe.irpe import native; raise SystemExit(native.build())"


@pytest.mark.slow  # a real build from scratch, ~35 s of one core; test_who_says_that_the_kernel_builds covers the logic
def test_a_build_says_so_once_and_the_cached_build_is_silent(tmp_path):
    """The first use on a new machine (an empty extension cache) compiles for about half a minute:
    the process says so on stderr, before and after, once each; the next process loads the cached
    build and says nothing. The build-ahead command prints the instruction set and the cache folder."""
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "RANK", native.ENV_SWITCH)}
    env["TORCH_EXTENSIONS_DIR"] = str(tmp_path)
    cold, warm = (subprocess.run([sys.executable, "-c", BUILD_AHEAD], capture_output=True, text=True, env=env,
                                 cwd=REPO, timeout=900) for _ in range(2))
    assert cold.returncode == 0, cold.stderr
    assert cold.stderr.count(BUILDING) == 1 and cold.stderr.count(BUILT) == 1, cold.stderr
    assert cold.stderr.index(BUILDING) < cold.stderr.index(BUILT)
    assert warm.returncode == 0 and BUILDING not in warm.stderr and BUILT not in warm.stderr, warm.stderr
    folder = tmp_path / f"detr_irpe_rpe_cpu_{native.instruction_set()}"
    assert cold.stdout == warm.stdout == f"iRPE CPU kernel: {native.instruction_set()} build, cached in {folder}\n"


class FakeExtensions:
    """``torch.utils.cpp_extension`` whose ``load`` "builds" by writing the library file (or not)."""

    def __init__(self, library, writes):
        self.library, self.writes = library, writes

    def load(self, **kwargs):
        if self.writes:
            self.library.write_bytes(b"a new build")
        return "the module"


@pytest.mark.parametrize("cached, writes, rank, said", [
    (False, True, None, [BUILDING, BUILT]),  # a new machine
    (True, False, None, []),  # the cached build loads
    (True, True, None, [BUILT]),  # ninja rebuilt what looked current: said after the fact
    (False, True, "0", [BUILDING, BUILT]),  # torchrun: local rank 0 speaks
    (False, True, "1", []),  # the other ranks wait for its lock in silence
])
def test_who_says_that_the_kernel_builds(tmp_path, monkeypatch, capsys, cached, writes, rank, said):
    library = tmp_path / "detr_irpe_rpe_cpu_x.so"
    if cached:
        library.write_bytes(b"an old build")
        os.utime(library, (2.0 ** 33, 2.0 ** 33))  # the year 2242: newer than the source and torch's headers
    monkeypatch.setattr(native, "_compile_flags", lambda: ("x", []))
    monkeypatch.setattr(native, "cache_folder", lambda tag=None: tmp_path)
    monkeypatch.setattr(native, "_cpp_extension", lambda: FakeExtensions(library, writes))
    monkeypatch.delenv("RANK", raising=False)
    if rank is None:
        monkeypatch.delenv("LOCAL_RANK", raising=False)
    else:
        monkeypatch.setenv("LOCAL_RANK", rank)
    assert native._build() == "the module"
    err = capsys.readouterr().err
    assert [s for s in (BUILDING, BUILT) if s in err] == said, err
    assert all(err.count(s) == 1 for s in said)


def test_switched_off_by_environment(monkeypatch):
    monkeypatch.setenv(native.ENV_SWITCH, "0")
    monkeypatch.setattr(native._State, "error", None)
    assert native.load() is None
    assert native.unavailable_reason() == "disabled by DETR_IRPE_NATIVE=0"


def test_kernel_rejects_malformed_inputs(kernel):
    q = torch.randn(1, 2, 6, 4)
    ids = torch.zeros(6, 6, dtype=torch.int16)
    empty = torch.empty(0, dtype=torch.bool)
    none = torch.empty(0, dtype=torch.int16)

    def forward(q, tables, ids, factors=(none, none, 0), dropout=0.0):
        specs = [(0, table, i, *factors) for table, i in zip(tables, ids)]
        return kernel.forward(q, q, q, 0.5, empty, specs, 4, dropout, 0)

    with pytest.raises(RuntimeError, match="int16"):
        forward(q, [torch.zeros(2, 3)], [ids.long()])
    with pytest.raises(RuntimeError, match="1 or H heads"):
        forward(q, [torch.zeros(3, 3)], [ids])
    with pytest.raises(RuntimeError, match="gh \\* gw = L"):
        forward(q, [torch.zeros(2, 3)], [ids], (torch.zeros(2, 2, dtype=torch.int16), torch.zeros(2, 2, dtype=torch.int16), 1))
    with pytest.raises(RuntimeError, match="out of the table's range"):
        forward(q, [torch.zeros(2, 3)], [ids], (torch.ones(2, 2, dtype=torch.int16), torch.ones(3, 3, dtype=torch.int16), 3))
    with pytest.raises(RuntimeError, match="contiguous"):
        forward(q.transpose(2, 3), [], [])
    with pytest.raises(RuntimeError, match=r"dropout must be in \[0, 1\), got 1"):
        forward(q, [], [], dropout=1.0)
    out, lse = forward(q, [torch.zeros(2, 3)], [ids])
    torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, q, q, scale=0.5))


def test_block_rows_keep_a_block_small():
    assert native.block_rows(850) == 77
    assert native.block_rows(16) == 128
    assert native.block_rows(100_000) == 16
