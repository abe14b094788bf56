"""The fused CPU kernel of the iRPE attention (``csrc/rpe_attention_cpu.cpp``) and its autograd wrapper.

The kernel is compiled with ``torch.utils.cpp_extension`` the first time it is needed (about half
a minute on 2 cores, once per torch version and CPU; cached under ``$TORCH_EXTENSIONS_DIR``, by
default ``~/.cache/torch_extensions``). A process that compiles it says so on stderr, before and
after (the only process, or local rank 0 under ``torchrun``); loading the cached build is silent.
:func:`build` (``make install`` runs it: ``python -c "from detr_irpe.irpe import native;
native.build()"``) builds it ahead of time. It needs a C++ compiler and ``ninja``. Where it cannot be built, :func:`load` warns once
and returns None, and the attention falls back to the pure-PyTorch row-chunked kernel
(:mod:`.chunked`), which computes the same thing more slowly. Set ``DETR_IRPE_NATIVE=0`` to skip
the build.
"""
from __future__ import annotations

import logging
import os
import platform
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from .plan import Plan, Term, sum_heads
from .spec import RPEConfig


SOURCE = Path(__file__).with_name("csrc") / "rpe_attention_cpu.cpp"
ENV_SWITCH = "DETR_IRPE_NATIVE"

# Term kinds, as csrc/rpe_attention_cpu.cpp numbers them.
BIAS, ROW_CONTEXT, COLUMN_CONTEXT, VALUE = 0, 1, 2, 3

# Bucket ids are int16 in the kernel (half the bytes read per logit): ids 0 .. 2^15 - 1.
MAX_BUCKETS = 1 << 15

# Query rows per block: about 2**16 logits (256 KiB in float32, so that a block, its gradient
# and the keys stay in a core's L2 cache), between 16 and 128 rows.
BLOCK_ELEMENTS = 1 << 16


class _State:
    lock = threading.Lock()
    tried = False
    module = None
    error: Optional[str] = None


ISA_FLAGS = {
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512dq", "-mavx512vl", "-mavx2", "-mfma"],
    "avx2": ["-mavx2", "-mfma"],
    "x86": [],
}
ISA_SWITCH = "DETR_IRPE_NATIVE_ISA"  # build for a lower level than the CPU has (to measure that path)


def instruction_set() -> str:
    """The instruction-set level the kernel is built for: ``avx512``, ``avx2`` or ``x86`` (what the
    CPU supports, or the lower level that ``DETR_IRPE_NATIVE_ISA`` asks for), else the machine name."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return platform.machine().lower() or "cpu"
    capability = torch.backends.cpu.get_cpu_capability()
    level = "avx512" if capability.startswith("AVX512") else "avx2" if capability == "AVX2" else "x86"
    asked = os.environ.get(ISA_SWITCH, "").strip().lower()
    if asked:
        order = list(ISA_FLAGS)
        if asked not in ISA_FLAGS or order.index(asked) < order.index(level):
            raise ValueError(f"{ISA_SWITCH}={asked!r}: this CPU supports {level}; choose one of "
                             f"{', '.join(order[order.index(level):])}")
        level = asked
    return level


def _compile_flags() -> Tuple[str, List[str]]:
    """A tag naming the instruction set and the flags for it (not ``-march=native``: the build
    cache may be shared by machines of one instruction-set level that differ otherwise)."""
    flags = ["-O3", "-fopenmp"]  # at::parallel_for is OpenMP code inlined from torch's headers
    tag = instruction_set()
    return tag, flags + ISA_FLAGS.get(tag, [])


def load():
    """The compiled kernel module, or None (with a warning, once) when it cannot be built."""
    if os.environ.get(ENV_SWITCH, "1").strip() == "0":
        _State.error = f"disabled by {ENV_SWITCH}=0"
        return None
    if _State.tried:
        return _State.module
    with _State.lock:
        if not _State.tried:
            _State.module = _build()
            _State.tried = True
    return _State.module


def unavailable_reason() -> Optional[str]:
    """Why :func:`load` returned None (None if it has not, or has not been called)."""
    return _State.error


def _cpp_extension():
    # importing cpp_extension logs a warning about CUDA_HOME on machines without CUDA
    cpp_logger = logging.getLogger("torch.utils.cpp_extension")
    level = cpp_logger.level
    cpp_logger.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension
    finally:
        cpp_logger.setLevel(level)
    return cpp_extension


def _name(tag: str) -> str:
    return f"detr_irpe_rpe_cpu_{tag}"


def cache_folder(tag: Optional[str] = None) -> Optional[Path]:
    """The folder the kernel for instruction set ``tag`` (default: this CPU's) is built and cached in
    (torch's choice: under ``$TORCH_EXTENSIONS_DIR`` or ``~/.cache/torch_extensions``; created if
    missing), or None where this torch does not say."""
    try:
        return Path(_cpp_extension()._get_build_directory(_name(tag or instruction_set()), False))
    except Exception:  # a torch without the (private) helper: let cpp_extension.load choose
        return None


def _speaks() -> bool:
    """Whether this process reports a build: the only process, or local rank 0 of a ``torchrun``
    job (every rank loads the kernel; one of them builds it, the others wait for its lock)."""
    return os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0")).strip() in ("", "0")


def _stamp(path: Path) -> Optional[Tuple[int, int, int]]:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size, st.st_ino


def _will_compile(library: Path) -> bool:
    """Whether loading ``library`` compiles it first: it is missing, or older than the kernel
    source or torch's extension header (a new torch). ninja has the last word (a changed header it
    tracks); :func:`_build` reports a build it did not foresee after the fact."""
    built = _stamp(library)
    if built is None:
        return True
    inputs = [SOURCE, Path(torch.__file__).with_name("include") / "torch" / "extension.h"]
    return any(s is not None and s[0] > built[0] for s in map(_stamp, inputs))


def _build():
    try:
        tag, flags = _compile_flags()
        cpp_extension = _cpp_extension()
        folder = cache_folder(tag)
        library = folder / (_name(tag) + (".pyd" if os.name == "nt" else ".so")) if folder is not None else None
        before = _stamp(library) if library is not None else None
        speaks = _speaks() and library is not None
        if speaks and _will_compile(library):
            print(f"detr_irpe: building the iRPE CPU kernel for {tag} in {folder} (once per torch version and "
                  f"CPU, about half a minute on 2 cores) ...", file=sys.stderr, flush=True)
        start = time.perf_counter()
        module = cpp_extension.load(name=_name(tag), sources=[str(SOURCE)], extra_cflags=flags,
                                    extra_ldflags=["-fopenmp"], verbose=False,
                                    build_directory=str(folder) if folder is not None else None)
        if speaks and _stamp(library) != before:
            print(f"detr_irpe: ... the iRPE CPU kernel built in {time.perf_counter() - start:.0f} s",
                  file=sys.stderr, flush=True)
        return module
    except Exception as exc:  # a missing compiler, ninja or BLAS symbol: fall back, do not fail
        message = " ".join(str(exc).split())
        _State.error = f"{type(exc).__name__}: {message[-600:]}"
        warnings.warn(f"detr_irpe: could not build the fused iRPE CPU kernel ({_State.error}). Falling back "
                      f"to the pure-PyTorch kernel, which gives the same results about twice as slowly. "
                      f"The kernel needs a C++ compiler and ninja (pip install ninja); set {ENV_SWITCH}=0 "
                      f"to skip the build.", RuntimeWarning, stacklevel=3)
        return None


def build() -> int:
    """Build (or load the cached build of) the kernel now, ahead of its first use; print the
    instruction set it is built for and its cache folder. Returns 0, or 1 (with the reason) where
    it cannot be built: the attention then runs the pure-PyTorch kernel."""
    if load() is None:
        print(f"the iRPE CPU kernel is not available ({unavailable_reason()}); the attention uses the "
              f"pure-PyTorch kernel, which gives the same results more slowly", file=sys.stderr)
        return 1
    print(f"iRPE CPU kernel: {instruction_set()} build, cached in {cache_folder()}")
    return 0


def _kernel_terms(plan: Plan, tables) -> List[tuple]:
    """The plan's terms as the kernel takes them: ``(kind, table, ids, factor rows, factor
    columns, side)`` each, the factors empty (and side 0) when the ids do not separate."""
    specs = []
    none = torch.empty(0, dtype=torch.int16)
    for term in plan.terms:
        table = tables[term.position]
        if term.which == "v":
            kind = VALUE
        elif term.mode == "bias":
            kind = BIAS
        else:
            kind = ROW_CONTEXT if term.which == "k" else COLUMN_CONTEXT
        rows, cols, side = term.factors if term.factors is not None else (none, none, 0)
        specs.append((kind, table.contiguous(), term.ids, rows, cols, side))
    return specs


def _padding(plan: Plan, batch: int, length: int) -> Tensor:
    if plan.pad is None:
        return torch.empty(0, dtype=torch.bool)
    return plan.pad.reshape(batch, length).contiguous()


class FusedRPEAttention(torch.autograd.Function):
    """:class:`.chunked.RowChunkedAttention` by the compiled kernel (its own dropout masks).

    Inputs: a :class:`.plan.Plan` whose terms carry int16 ids as the kernel reads them
    (transposed for a term on queries), q, k, v ``(B, H, L, D)`` and the tables its terms name.
    Returns ``(B, H, L, D)``.
    """

    @staticmethod
    def forward(ctx, plan: Plan, q: Tensor, k: Tensor, v: Tensor, *tables: Tensor) -> Tensor:
        kernel = load()
        B, H, L, _ = q.shape
        ctx.table_dtypes = [t.dtype for t in tables]
        tables = tuple(t.to(q.dtype) for t in tables)
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        out, lse = kernel.forward(q, k, v, plan.scale, _padding(plan, B, L), _kernel_terms(plan, tables), plan.rows,
                                   plan.dropout, plan.seed)
        ctx.plan = plan
        ctx.save_for_backward(q, k, v, out, lse, *tables)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        plan: Plan = ctx.plan
        q, k, v, out, lse, *tables = ctx.saved_tensors
        B, H, L, _ = q.shape
        grad_q, grad_k, grad_v, *term_grads = load().backward(
            q, k, v, out, lse, grad_out.contiguous(), plan.scale, _padding(plan, B, L), _kernel_terms(plan, tables),
            plan.rows, plan.dropout, plan.seed)
        grad_tables: List[Optional[Tensor]] = [None] * len(tables)
        for term, grad in zip(plan.terms, term_grads):
            grad_tables[term.position] = sum_heads(grad.sum(0), tables[term.position].shape[0])
        grad_tables = [g.to(dt) for g, dt in zip(grad_tables, ctx.table_dtypes)]
        return (None, grad_q, grad_k, grad_v, *grad_tables)


def block_rows(length: int) -> int:
    """Query rows per block of the fused kernel for ``length`` keys."""
    return max(16, min(128, BLOCK_ELEMENTS // max(length, 1)))


def represents(config: RPEConfig) -> bool:
    """Whether the kernel's int16 bucket ids hold every bucket of ``config``'s tables."""
    return config.num_buckets <= MAX_BUCKETS


def make_plan(tables, get_ids, grid: Tuple[int, int], skip: int, shape: Tuple[int, ...], scale: float,
              pad: Optional[Tensor], dropout: float, seed: int, rows: Optional[int] = None) -> Plan:
    """As :func:`.chunked.make_plan`, with the ids as the kernel reads them: int16, transposed for
    a term on queries (it reads rows of ``b(j, i)``), and their separable factors."""
    terms = []
    for position, (which, table) in enumerate(tables):
        if table.num_buckets > MAX_BUCKETS:
            raise ValueError(f"the compiled iRPE kernel holds at most {MAX_BUCKETS} buckets per table, got "
                             f"{table.num_buckets}")
        layout = dict(transposed=which == "q", dtype=torch.int16)
        terms.append(Term(which, table.mode, get_ids(table.method, **layout), position, grid,
                          factors=get_ids(table.method, factors=True, **layout)))
    L = shape[2]
    return Plan(tuple(terms), scale, pad, dropout, seed, min(rows or block_rows(L), L))


def run(plan: Plan, q: Tensor, k: Tensor, v: Tensor, tables) -> Tensor:
    """:class:`FusedRPEAttention` of ``(B, H, L, D)`` q, k, v with the plan's ``tables``."""
    return FusedRPEAttention.apply(plan, q, k, v, *tables)


if __name__ == "__main__":  # python -m detr_irpe.irpe.native
    from detr_irpe.irpe import native  # the package's module (its state), not this __main__ copy

    raise SystemExit(native.build())
