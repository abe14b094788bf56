"""Fused iRPE attention for GPUs, in Triton: flash-attention forward and backward with the iRPE terms.

The same computation as :mod:`.chunked` and :mod:`.native`, behind the same ``make_plan`` / ``run``
interface, with no ``(B, H, L, L)`` tensor in forward or backward, and no ``(L, L)`` one read by the kernels:

* **Bucket ids by offset.** Every method's bucket is a function of the offset ``(dr, dc)``
  between two image tokens, so a plan carries, per table method, a ``(2h - 1, 2w - 1)`` int32
  table of ids by offset (:func:`offset_ids`, read once from the layer's cached ids). A kernel
  finds a pair's place in it from the two tokens' grid positions (:func:`_pairs`); pairs with a
  skip token read the extra bucket ``num_buckets - 1`` stored at both ends (:func:`kernel_ids`).
* **Per-token bucket rows.** A term's value for a pair is read from a ``(L, buckets)`` row per
  token, prepared by a small matrix product before the kernel: ``scale * q @ r`` for a
  contextual term on keys (row ``i``, column ``b(i, j)``), ``scale * k @ r`` on queries (row
  ``j``, column ``b(j, i)``), the table itself in bias mode (one row, stride 0). Backward
  scatters the logits' gradients into buffers of the same layout (atomic adds; the rows of a
  buffer belong to the program that owns those tokens, so programs never contend), and matrix
  products after the kernel turn them into the gradients of q / k and the tables.
* **Values.** ``out_i += sum_n M[i, n] rv[n]`` with ``M[i, n] = sum_j a_ij [b(i, j) = n]``, the
  attention mass per bucket: a second forward kernel scatters the final weights (recomputed
  from the log-sum-exp) into ``M``, which backward keeps for the table's gradient ``M^T dO``;
  the weights' gradient gains ``dO_i . rv[b(i, j)]``, gathered from ``dO @ rv^T``.
* **Flash-attention-2 blocks** of 32 tokens. Forward: one program per block of query rows,
  online softmax over blocks of keys, saving the log-sum-exp. Backward: one kernel per query
  block (dq, the key-side scatter) and one per key block (dk, dv, the query-side scatter), both
  recomputing the probabilities from the log-sum-exp. Accumulation in float32 for every input
  dtype; float32 products in full float32 (not TF32).
* **Dropout** in the kernels: keep ``(b, h, i, j)`` when ``tl.rand(seed, ((b H + h) L + i) L + j)
  >= p``, so that every kernel, and backward, draws the same mask (:func:`dropout_mask` returns
  it, for tests).

Runs on CUDA (compute capability 8.0 and later), or on CPU tensors through triton's interpreter
when ``TRITON_INTERPRET=1`` is set before triton is imported (slow; that is how the tests run it).
"""
from __future__ import annotations

from typing import Dict, List, NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from .plan import Plan, Term, sum_heads
from .spec import RPEConfig

try:
    import triton
    import triton.language as tl
except ImportError as exc:  # optional: the other kernels serve without it
    triton = tl = None
    IMPORT_ERROR: Optional[str] = f"triton cannot be imported ({exc})"
else:
    IMPORT_ERROR = None

HEAD_DIMS = (32, 64)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# The per-token bucket buffers are (B, H, L, buckets) float32, one per side with an encoding:
# beyond about a thousand buckets they approach the (B, H, L, L) weights the kernel never forms
# (DETR: L ~ 1000). The product method has at most 961 buckets below ratio 8.0 (962 with a skip
# token), 1089 at 8.0.
MAX_BUCKETS = 1024
# Tokens per block (query rows, and keys per step): 32, or 16 when a plan asks for fewer rows.
# Blocks of 32 x 32 pairs keep the per-pair iRPE work (bucket ids, gathers, atomic adds, dropout)
# in registers: ptxas spills at most a few dozen bytes (344 for the float32 dk / dv kernel with
# 64-channel heads), against kilobytes with 64 x 64 blocks (tests/test_irpe_triton.py compiles
# every specialization for sm_80 and sm_90 and checks).
BLOCKS = (16, 32)
DEFAULT_BLOCK = 32
NUM_STAGES = 2


def num_warps(dtype: torch.dtype, head_dim: int) -> int:
    """Warps per program: 8 for float32 with 64-channel heads (float32 products run on the FMA
    units, whose operands take more registers), else 4."""
    return 8 if dtype == torch.float32 and head_dim == 64 else 4


def _jit(fn):
    """``triton.jit`` where triton imports; else the plain function, never launched (see :func:`available`)."""
    return triton.jit(fn) if triton is not None else fn


# --------------------------------------------------------------------------------------------
# Triton building blocks
# --------------------------------------------------------------------------------------------

@_jit
def _pairs(rows, cols, skip, height, width):
    """``(M, N)`` index of each pair of query tokens ``rows`` and key tokens ``cols`` in a row of
    :func:`kernel_ids`: 0 for a pair with a skip token, else 1 + the position of the offset
    ``p_i - p_j`` in the ``(2h - 1, 2w - 1)`` ids by offset (tokens past the end: any index)."""
    image_tokens = height * width
    ti = tl.minimum(tl.maximum(rows - skip, 0), image_tokens - 1)
    tj = tl.minimum(tl.maximum(cols - skip, 0), image_tokens - 1)
    span = 2 * width - 1
    # 1 + (r_i - r_j + h - 1) * span + (c_i - c_j + w - 1), split into a part of i and one of j
    at_i = (ti // width + height - 1) * span + ti % width + width
    at_j = (tj // width) * span + tj % width
    skipped = (rows < skip)[:, None] | (cols < skip)[None, :]
    return tl.where(skipped, 0, at_i[:, None] - at_j[None, :])


@_jit
def _bucket_offsets(pair, tokens, part, row_stride, buckets, Ids, last, QUERY_SIDE: tl.constexpr):
    """``(M, N)`` offsets of the pairs' values in a ``(L, parts * buckets)`` per-token buffer: row
    ``i`` (``tokens``: the query tokens), column ``part * buckets + b(i, j)`` for terms on keys and
    values; row ``j`` (``tokens``: the key tokens), column ``part * buckets + b(j, i)`` for terms on
    queries, whose offset ``p_j - p_i`` sits at ``last - pair``. ``row_stride`` 0: one row (a bias
    table). ``pair``: :func:`_pairs`; ``Ids``: :func:`kernel_ids`, rows of ``last + 1``."""
    if QUERY_SIDE:
        ids = tl.load(Ids + part * (last + 1) + (last - pair))
        return tokens[None, :] * row_stride + (part * buckets + ids)
    ids = tl.load(Ids + part * (last + 1) + pair)
    return tokens[:, None] * row_stride + (part * buckets + ids)


@_jit
def _dropout_multipliers(seed, bh, rows, cols, seq_len, dropout_p):
    """``(M, N)`` multipliers of the weights of (batch * heads + head ``bh``, ``rows``, ``cols``):
    0 with probability ``dropout_p``, else ``1 / (1 - dropout_p)``; one philox draw per pair."""
    pairs = (bh.to(tl.int64) * seq_len + rows[:, None]) * seq_len + cols[None, :]
    return tl.where(tl.rand(seed, pairs) >= dropout_p, 1.0 / (1.0 - dropout_p), 0.0)


@_jit
def _load_rows(X, tokens, seq_len, HEAD_DIM: tl.constexpr):
    """``(M, HEAD_DIM)`` rows ``tokens`` of a ``(L, HEAD_DIM)`` matrix, zeros past the end."""
    dims = tl.arange(0, HEAD_DIM)
    return tl.load(X + tokens[:, None] * HEAD_DIM + dims[None, :], mask=(tokens < seq_len)[:, None], other=0.0)


@_jit
def _store_rows(X, tokens, seq_len, x, HEAD_DIM: tl.constexpr):
    """Rows ``tokens`` of a ``(L, HEAD_DIM)`` matrix = ``x`` in its dtype, those past the end left out."""
    dims = tl.arange(0, HEAD_DIM)
    tl.store(X + tokens[:, None] * HEAD_DIM + dims[None, :], x.to(X.dtype.element_ty),
             mask=(tokens < seq_len)[:, None])


@_jit
def _logits(q, k, pair, q_tok, k_tok, cols, seq_len, scale, pad, parts, buckets, Ids, last,
            src_q, q_stride, src_k, k_stride, ON_Q: tl.constexpr, ON_K: tl.constexpr, PRECISION: tl.constexpr):
    """``(M, N)`` logits of query and key tiles ``q`` ``(M, D)`` and ``k`` ``(N, D)``: ``scale q.k`` plus
    the iRPE terms on queries and keys, read from the per-token bucket rows ``src_q`` / ``src_k``
    of this batch and head; -inf on padded keys and on keys ``cols`` past the end. ``q_tok``,
    ``k_tok``: the tokens clamped to the sequence; ``pad``: this batch's ``(L,)`` key padding."""
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
    for part in range(parts):
        if ON_K:
            s += tl.load(src_k + _bucket_offsets(pair, q_tok, part, k_stride, buckets, Ids, last, False))
        if ON_Q:
            s += tl.load(src_q + _bucket_offsets(pair, k_tok, part, q_stride, buckets, Ids, last, True))
    padded = tl.load(pad + cols, mask=cols < seq_len, other=1)
    return tl.where((padded == 0)[None, :], s, float("-inf"))


@_jit
def _scatter(buffer, values, pair, tokens, parts, buckets, Ids, last, QUERY_SIDE: tl.constexpr):
    """Add the ``(M, N)`` pair ``values`` to a ``(L, parts * buckets)`` per-token buffer at each pair's
    bucket in every part (see :func:`_bucket_offsets`). Zeros (padded keys, tokens past the end,
    dropped weights) are skipped."""
    for part in range(parts):
        at = _bucket_offsets(pair, tokens, part, parts * buckets, buckets, Ids, last, QUERY_SIDE)
        tl.atomic_add(buffer + at, values, mask=values != 0, sem="relaxed")


@_jit
def _gather_values(G, pair, q_tok, parts, buckets, Ids, last):
    """``(M, N)`` sum over parts of ``G[i, part * buckets + b(i, j)]`` (an encoding on values)."""
    total = tl.zeros(pair.shape, tl.float32)
    for part in range(parts):
        total += tl.load(G + _bucket_offsets(pair, q_tok, part, parts * buckets, buckets, Ids, last, False))
    return total


# --------------------------------------------------------------------------------------------
# Kernels. Each program handles one (batch, head) and one block of BLOCK tokens: program id
# = (batch * heads + head) * blocks + block. Tensors are contiguous: q, k, v, out and their
# gradients (B, H, L, HEAD_DIM); lse, delta (B, H, L); per-token bucket buffers
# (B, H, L, parts * buckets); the bias tables (heads, parts * buckets), reached through the
# strides src_b, src_h (0 for a table shared by the heads) and src_l (0 for a bias table).
# Tokens past the end read the last token's bucket rows (always in bounds); their logits are
# -inf (keys) or their probabilities 0 (queries, whose log-sum-exp reads as +inf), so they add
# nothing anywhere.
# --------------------------------------------------------------------------------------------

@_jit
def _program(seq_len, heads, BLOCK: tl.constexpr):
    """``(batch, head, batch * heads + head, first token)`` of this program."""
    blocks = tl.cdiv(seq_len, BLOCK)
    bh = tl.program_id(0) // blocks
    return (bh // heads).to(tl.int64), (bh % heads).to(tl.int64), bh, (tl.program_id(0) % blocks) * BLOCK


@_jit
def _forward_kernel(Q, K, V, Out, Lse, Pad, pad_stride, Ids, SrcQ, sq_b, sq_h, sq_l, SrcK, sk_b, sk_h, sk_l,
                    seq_len, heads, parts, buckets, skip, height, width, scale, dropout_p, seed,
                    HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, ON_Q: tl.constexpr, ON_K: tl.constexpr,
                    DROPOUT: tl.constexpr, PRECISION: tl.constexpr):
    """``Out`` (without an encoding on values) and the log-sum-exp ``Lse`` of a block of query rows."""
    b, h, bh, start = _program(seq_len, heads, BLOCK)
    head = bh.to(tl.int64) * seq_len * HEAD_DIM
    src_q, src_k, pad = SrcQ + b * sq_b + h * sq_h, SrcK + b * sk_b + h * sk_h, Pad + b * pad_stride
    last = (2 * height - 1) * (2 * width - 1) + 1
    rows = start + tl.arange(0, BLOCK)
    q_tok = tl.minimum(rows, seq_len - 1)
    q = _load_rows(Q + head, rows, seq_len, HEAD_DIM)
    m = tl.full([BLOCK], float("-inf"), tl.float32)
    total = tl.zeros([BLOCK], tl.float32)
    acc = tl.zeros([BLOCK, HEAD_DIM], tl.float32)
    for key_start in range(0, seq_len, BLOCK):
        cols = key_start + tl.arange(0, BLOCK)
        k_tok = tl.minimum(cols, seq_len - 1)
        k = _load_rows(K + head, cols, seq_len, HEAD_DIM)
        v = _load_rows(V + head, cols, seq_len, HEAD_DIM)
        pair = _pairs(rows, cols, skip, height, width)
        s = _logits(q, k, pair, q_tok, k_tok, cols, seq_len, scale, pad, parts, buckets, Ids, last,
                    src_q, sq_l, src_k, sk_l, ON_Q, ON_K, PRECISION)
        m_new = tl.maximum(m, tl.max(s, 1))
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # every key so far padded
        p = tl.exp(s - shift[:, None])
        alpha = tl.exp(m - shift)
        total = total * alpha + tl.sum(p, 1)
        if DROPOUT:
            p *= _dropout_multipliers(seed, bh, rows, cols, seq_len, dropout_p)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m = m_new
    _store_rows(Out + head, rows, seq_len, acc / total[:, None], HEAD_DIM)
    tl.store(Lse + bh * seq_len + rows, m + tl.log(total), mask=rows < seq_len)


@_jit
def _mass_kernel(Q, K, Lse, Mass, Pad, pad_stride, Ids, SrcQ, sq_b, sq_h, sq_l, SrcK, sk_b, sk_h, sk_l,
                 seq_len, heads, parts, buckets, skip, height, width, scale, dropout_p, seed,
                 HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, ON_Q: tl.constexpr, ON_K: tl.constexpr,
                 DROPOUT: tl.constexpr, PRECISION: tl.constexpr):
    """With an encoding on values: ``Mass[i, n] = sum_j a_ij [b(i, j) = n]`` (zero-initialised) for a
    block of query rows, the weights ``a`` (after dropout) recomputed from the final log-sum-exp."""
    b, h, bh, start = _program(seq_len, heads, BLOCK)
    head = bh.to(tl.int64) * seq_len * HEAD_DIM
    src_q, src_k, pad = SrcQ + b * sq_b + h * sq_h, SrcK + b * sk_b + h * sk_h, Pad + b * pad_stride
    mass = Mass + bh.to(tl.int64) * seq_len * parts * buckets
    last = (2 * height - 1) * (2 * width - 1) + 1
    rows = start + tl.arange(0, BLOCK)
    q_tok = tl.minimum(rows, seq_len - 1)
    q = _load_rows(Q + head, rows, seq_len, HEAD_DIM)
    lse = tl.load(Lse + bh * seq_len + rows, mask=rows < seq_len, other=float("inf"))
    for key_start in range(0, seq_len, BLOCK):
        cols = key_start + tl.arange(0, BLOCK)
        k_tok = tl.minimum(cols, seq_len - 1)
        k = _load_rows(K + head, cols, seq_len, HEAD_DIM)
        pair = _pairs(rows, cols, skip, height, width)
        s = _logits(q, k, pair, q_tok, k_tok, cols, seq_len, scale, pad, parts, buckets, Ids, last,
                    src_q, sq_l, src_k, sk_l, ON_Q, ON_K, PRECISION)
        a = tl.exp(s - lse[:, None])
        if DROPOUT:
            a *= _dropout_multipliers(seed, bh, rows, cols, seq_len, dropout_p)
        _scatter(mass, a, pair, q_tok, parts, buckets, Ids, last, False)


@_jit
def _dq_kernel(Q, K, V, dO, Lse, Delta, dQ, dSrcK, G, Pad, pad_stride, Ids, SrcQ, sq_b, sq_h, sq_l,
               SrcK, sk_b, sk_h, sk_l, seq_len, heads, parts, buckets, skip, height, width, scale,
               dropout_p, seed, HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, ON_Q: tl.constexpr, ON_K: tl.constexpr,
               ON_V: tl.constexpr, DROPOUT: tl.constexpr, PRECISION: tl.constexpr):
    """Backward over the keys of a block of query rows: ``dQ`` (float32) and, with a term on keys,
    the logits' gradients summed per query and bucket into ``dSrcK`` (zero-initialised).
    ``G[i, n] = dO_i . rv[n]`` (with a term on values)."""
    b, h, bh, start = _program(seq_len, heads, BLOCK)
    head = bh.to(tl.int64) * seq_len * HEAD_DIM
    src_q, src_k, pad = SrcQ + b * sq_b + h * sq_h, SrcK + b * sk_b + h * sk_h, Pad + b * pad_stride
    buffer = bh.to(tl.int64) * seq_len * parts * buckets  # this head's rows in G and dSrcK
    last = (2 * height - 1) * (2 * width - 1) + 1
    rows = start + tl.arange(0, BLOCK)
    q_tok = tl.minimum(rows, seq_len - 1)
    q = _load_rows(Q + head, rows, seq_len, HEAD_DIM)
    do = _load_rows(dO + head, rows, seq_len, HEAD_DIM)
    lse = tl.load(Lse + bh * seq_len + rows, mask=rows < seq_len, other=float("inf"))
    delta = tl.load(Delta + bh * seq_len + rows, mask=rows < seq_len, other=0.0)
    dq = tl.zeros([BLOCK, HEAD_DIM], tl.float32)
    for key_start in range(0, seq_len, BLOCK):
        cols = key_start + tl.arange(0, BLOCK)
        k_tok = tl.minimum(cols, seq_len - 1)
        k = _load_rows(K + head, cols, seq_len, HEAD_DIM)
        v = _load_rows(V + head, cols, seq_len, HEAD_DIM)
        pair = _pairs(rows, cols, skip, height, width)
        s = _logits(q, k, pair, q_tok, k_tok, cols, seq_len, scale, pad, parts, buckets, Ids, last,
                    src_q, sq_l, src_k, sk_l, ON_Q, ON_K, PRECISION)
        p = tl.exp(s - lse[:, None])
        da = tl.dot(do, tl.trans(v), input_precision=PRECISION)  # gradient of the weights a_ij
        if ON_V:
            da += _gather_values(G + buffer, pair, q_tok, parts, buckets, Ids, last)
        if DROPOUT:
            da *= _dropout_multipliers(seed, bh, rows, cols, seq_len, dropout_p)
        ds = p * (da - delta[:, None])  # gradient of the logits
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
        if ON_K:
            _scatter(dSrcK + buffer, ds, pair, q_tok, parts, buckets, Ids, last, False)
    _store_rows(dQ + head, rows, seq_len, dq * scale, HEAD_DIM)


@_jit
def _dkdv_kernel(Q, K, V, dO, Lse, Delta, dK, dV, dSrcQ, G, Pad, pad_stride, Ids, SrcQ, sq_b, sq_h, sq_l,
                 SrcK, sk_b, sk_h, sk_l, seq_len, heads, parts, buckets, skip, height, width, scale,
                 dropout_p, seed, HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, ON_Q: tl.constexpr,
                 ON_K: tl.constexpr, ON_V: tl.constexpr, DROPOUT: tl.constexpr, PRECISION: tl.constexpr):
    """Backward over the queries of a block of keys: ``dK``, ``dV`` (float32) and, with a term on
    queries, the logits' gradients summed per key and bucket into ``dSrcQ`` (zero-initialised)."""
    b, h, bh, start = _program(seq_len, heads, BLOCK)
    head = bh.to(tl.int64) * seq_len * HEAD_DIM
    src_q, src_k, pad = SrcQ + b * sq_b + h * sq_h, SrcK + b * sk_b + h * sk_h, Pad + b * pad_stride
    buffer = bh.to(tl.int64) * seq_len * parts * buckets  # this head's rows in G and dSrcQ
    last = (2 * height - 1) * (2 * width - 1) + 1
    cols = start + tl.arange(0, BLOCK)
    k_tok = tl.minimum(cols, seq_len - 1)
    k = _load_rows(K + head, cols, seq_len, HEAD_DIM)
    v = _load_rows(V + head, cols, seq_len, HEAD_DIM)
    dk = tl.zeros([BLOCK, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK, HEAD_DIM], tl.float32)
    for query_start in range(0, seq_len, BLOCK):
        rows = query_start + tl.arange(0, BLOCK)
        q_tok = tl.minimum(rows, seq_len - 1)
        q = _load_rows(Q + head, rows, seq_len, HEAD_DIM)
        do = _load_rows(dO + head, rows, seq_len, HEAD_DIM)
        lse = tl.load(Lse + bh * seq_len + rows, mask=rows < seq_len, other=float("inf"))
        delta = tl.load(Delta + bh * seq_len + rows, mask=rows < seq_len, other=0.0)
        pair = _pairs(rows, cols, skip, height, width)
        s = _logits(q, k, pair, q_tok, k_tok, cols, seq_len, scale, pad, parts, buckets, Ids, last,
                    src_q, sq_l, src_k, sk_l, ON_Q, ON_K, PRECISION)
        p = tl.exp(s - lse[:, None])
        da = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        if ON_V:
            da += _gather_values(G + buffer, pair, q_tok, parts, buckets, Ids, last)
        a = p
        if DROPOUT:
            z = _dropout_multipliers(seed, bh, rows, cols, seq_len, dropout_p)
            a = p * z
            da *= z
        dv += tl.dot(tl.trans(a.to(do.dtype)), do, input_precision=PRECISION)
        ds = p * (da - delta[:, None])
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)
        if ON_Q:
            _scatter(dSrcQ + buffer, ds, pair, k_tok, parts, buckets, Ids, last, True)
    _store_rows(dK + head, cols, seq_len, dk * scale, HEAD_DIM)
    _store_rows(dV + head, cols, seq_len, dv, HEAD_DIM)


@_jit
def _dropout_mask_kernel(Out, seq_len, dropout_p, seed, BLOCK: tl.constexpr):
    """The multipliers of one (batch, head) and block of query rows, into ``Out`` ``(B, H, L, L)``."""
    blocks = tl.cdiv(seq_len, BLOCK)
    bh = tl.program_id(0) // blocks
    rows = (tl.program_id(0) % blocks) * BLOCK + tl.arange(0, BLOCK)
    for key_start in range(0, seq_len, BLOCK):
        cols = key_start + tl.arange(0, BLOCK)
        z = _dropout_multipliers(seed, bh, rows, cols, seq_len, dropout_p)
        at = (bh.to(tl.int64) * seq_len + rows[:, None]) * seq_len + cols[None, :]
        tl.store(Out + at, z, mask=(rows < seq_len)[:, None] & (cols < seq_len)[None, :])


@_jit
def _bucket_ids_kernel(Out, Ids, seq_len, skip, height, width, QUERY_SIDE: tl.constexpr, BLOCK: tl.constexpr):
    """The bucket id every pair of a block of query rows gets in the kernels, into ``Out`` ``(L, L)``:
    the column :func:`_bucket_offsets` finds in a buffer of one row (row stride 0)."""
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    last = (2 * height - 1) * (2 * width - 1) + 1
    for key_start in range(0, seq_len, BLOCK):
        cols = key_start + tl.arange(0, BLOCK)
        pair = _pairs(rows, cols, skip, height, width)
        ids = _bucket_offsets(pair, rows, 0, 0, 0, Ids, last, QUERY_SIDE)
        tl.store(Out + rows[:, None] * seq_len + cols[None, :], ids,
                 mask=(rows < seq_len)[:, None] & (cols < seq_len)[None, :])


# --------------------------------------------------------------------------------------------
# What the kernels can serve
# --------------------------------------------------------------------------------------------

# Whether the kernels above were built for triton's interpreter (TRITON_INTERPRET=1 when triton
# was imported): then they run CPU tensors, and only those.
INTERPRETED = type(_forward_kernel).__name__ == "InterpretedFunction"


def available(device_type: str = "cuda") -> Optional[str]:
    """None if the kernels can run on tensors of ``device_type``, else the reason: CUDA with a
    GPU of compute capability 8.0 or later, or CPU tensors through triton's interpreter."""
    if IMPORT_ERROR is not None:
        return IMPORT_ERROR
    if device_type == "cpu":
        return None if INTERPRETED else ("the Triton kernel runs CPU tensors only through triton's interpreter: "
                                         "set TRITON_INTERPRET=1 before triton is first imported")
    if device_type != "cuda":
        return f"the Triton kernel runs on CUDA devices, not {device_type}"
    if INTERPRETED:
        return "TRITON_INTERPRET=1 was set when triton was imported: the kernels were built for the interpreter"
    if not torch.cuda.is_available():
        return "no CUDA device is available"
    major, minor = torch.cuda.get_device_capability()
    if major < 8:
        return f"the GPU has compute capability {major}.{minor}; the Triton kernel needs 8.0 (Ampere) or later"
    return None


def _refusal(num_buckets: int, head_dim: int, dropout: float) -> Optional[str]:
    if head_dim not in HEAD_DIMS:
        return (f"head dim {head_dim}: the Triton kernel is built for head dims {HEAD_DIMS} (DETR: 256 channels "
                f"/ 8 heads = 32)")
    if num_buckets > MAX_BUCKETS:
        return (f"{num_buckets} buckets per table: the Triton kernel's per-token bucket buffers (B, H, L, buckets) "
                f"hold at most {MAX_BUCKETS}")
    if not 0.0 <= dropout < 1.0:
        return f"dropout must be in [0, 1), got {dropout}"
    return None


def represents(config: Optional[RPEConfig], head_dim: int, dropout: float) -> Optional[str]:
    """None if the kernel can serve an attention with iRPE ``config`` (None: without iRPE), heads of
    ``head_dim`` channels and ``dropout``; else the reason. Input dtypes: :data:`DTYPES`."""
    return _refusal(config.num_buckets if config is not None else 0, head_dim, dropout)


# --------------------------------------------------------------------------------------------
# Plan
# --------------------------------------------------------------------------------------------

def offset_ids(ids: Tensor, grid: Tuple[int, int], skip: int) -> Tensor:
    """The bucket ids of ``(L, L)`` ``ids`` by offset: ``(2h - 1, 2w - 1)`` int32 with
    ``out[dr + h - 1, dc + w - 1]`` = the id of image tokens ``p_i - p_j = (dr, dc)``.

    Read from one pair per offset: the query at ``(max(dr, 0), max(dc, 0))``, the key at
    ``(max(-dr, 0), max(-dc, 0))``. Every method's id depends on the offset only (the tests
    rebuild every pair's id from this table, as the kernels do, and compare).
    """
    h, w = grid
    dr = torch.arange(1 - h, h, device=ids.device)
    dc = torch.arange(1 - w, w, device=ids.device)
    query = skip + dr.clamp(min=0)[:, None] * w + dc.clamp(min=0)[None, :]
    key = skip + (-dr).clamp(min=0)[:, None] * w + (-dc).clamp(min=0)[None, :]
    return ids[query, key].to(torch.int32).contiguous()


def block_size(rows: Optional[int]) -> int:
    """Tokens per block for a plan asking for ``rows`` query rows per block (None: the default):
    the largest of :data:`BLOCKS` not above it (at least the smallest)."""
    if rows is None:
        return DEFAULT_BLOCK
    return max([b for b in BLOCKS if b <= rows] or [BLOCKS[0]])


def make_plan(tables, get_ids, grid: Optional[Tuple[int, int]], skip: int, shape: Tuple[int, ...], scale: float,
              pad: Optional[Tensor], dropout: float, seed: int, rows: Optional[int] = None) -> Plan:
    """As :func:`.chunked.make_plan`, with each term's ids as :func:`offset_ids` of ``get_ids(method)``
    and ``rows`` as :func:`block_size`'s block. Raises ValueError with :func:`represents`' reason."""
    head_dim = shape[3]
    reason = _refusal(max([t.num_buckets for _, t in tables], default=0), head_dim, dropout)
    if reason is not None:
        raise ValueError(f"rpe_impl='triton': {reason}")
    methods = {which: tuple(t.method for w, t in tables if w == which) for which, _ in tables}
    if len(set(methods.values())) > 1:
        raise ValueError(f"the Triton kernel takes one bucket method for q, k and v, got {methods}")
    by_offset: Dict[str, Tensor] = {}  # the tables of one method (on q, k, v) share their ids
    terms = []
    for position, (which, table) in enumerate(tables):
        if table.method not in by_offset:
            by_offset[table.method] = offset_ids(get_ids(table.method), grid, skip)
        terms.append(Term(which, table.mode, by_offset[table.method], position, grid))
    return Plan(tuple(terms), scale, pad, dropout, seed, block_size(rows))


# --------------------------------------------------------------------------------------------
# Launch
# --------------------------------------------------------------------------------------------

class _Side(NamedTuple):
    """The tables of one of q, k, v: their mode, positions among the tables (one per part:
    ``cross`` has two) and buckets per part."""
    which: str
    mode: str
    positions: Tuple[int, ...]
    buckets: int

    @property
    def bucket_dim(self) -> int:
        """Tables on values are ``(heads, nb, D)``; on q / k ``(heads, D, nb)`` or, bias, ``(heads, nb)``."""
        return 1 if self.which == "v" else -1

    def table(self, tables) -> Tensor:
        """The parts' tables in float32, concatenated along the buckets (``parts * nb``)."""
        return torch.cat([tables[p].float() for p in self.positions], dim=self.bucket_dim)

    def gradients(self, grad: Tensor, tables) -> List[Tuple[int, Tensor]]:
        """``(position, gradient)`` of each part's table, from the per-head gradient ``grad`` of
        :meth:`table` (summed over heads for a shared table), in the table's dtype."""
        grad = sum_heads(grad, tables[self.positions[0]].shape[0])
        return [(p, g.to(tables[p].dtype)) for p, g in zip(self.positions, grad.split(self.buckets, self.bucket_dim))]


def _sides(plan: Plan, tables) -> Dict[str, _Side]:
    sides = {}
    for which in "qkv":
        terms = [t for t in plan.terms if t.which == which]
        if terms:
            table = tables[terms[0].position]
            buckets = table.shape[1] if which == "v" else table.shape[-1]
            sides[which] = _Side(which, terms[0].mode, tuple(t.position for t in terms), buckets)
    return sides


def _source(side: Optional[_Side], x: Tensor, tables, scale: float) -> Tuple[Tensor, int, int, int]:
    """What the kernels read a term on queries (``x`` = k) or keys (``x`` = q) from, and its batch,
    head and token strides: ``scale * x @ table`` ``(B, H, L, parts * nb)`` in contextual mode,
    the bias table ``(heads, parts * nb)`` itself (token stride 0) in bias mode."""
    if side is None:
        return x.new_zeros(1, dtype=torch.float32), 0, 0, 0
    table = side.table(tables)
    if side.mode == "bias":
        return table.contiguous(), 0, table.shape[1] if table.shape[0] > 1 else 0, 0
    src = torch.matmul(x.float(), table).mul_(scale)
    return src, *src.stride()[:3]


def precision(dtype: torch.dtype) -> str:
    """``tl.dot``'s input precision: float32 products in full float32 (as the CPU kernels and
    PyTorch's default compute them), not TF32."""
    return "ieee" if dtype == torch.float32 else "tf32"


def flags(dtype: torch.dtype, head_dim: int, block: int, on: str, dropout: bool) -> Dict[str, object]:
    """The compile-time flags of a launch (``on``: the sides with an encoding, a subset of ``qkv``);
    the forward and mass kernels take all but ``ON_V``."""
    return dict(HEAD_DIM=head_dim, BLOCK=block, ON_Q="q" in on, ON_K="k" in on, ON_V="v" in on,
                DROPOUT=bool(dropout), PRECISION=precision(dtype))


_TRITON_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
_INPUTS = ("Q", "K", "V", "dO")  # the input dtype; every other float buffer is float32


def signature(kernel, dtype: torch.dtype, on: str) -> Tuple[Dict[str, str], Dict[Tuple[int], list]]:
    """The argument types a launch of ``kernel`` gives triton (for ahead-of-time compilation) and
    the attributes triton gives aligned pointers: ``(signature, attrs)`` for ``triton.compiler.ASTSource``.
    ``on``: the sides with an encoding (``Out`` is float32 before an encoding on values is added)."""
    types, attrs = {}, {}
    for index, param in enumerate(kernel.params):
        name = param.name
        if param.is_constexpr:
            types[name] = "constexpr"
            continue
        if name[0].isupper() or name[1:2].isupper():  # tensors are capitalised: Q, Out, dQ, dSrcK, ...
            if name in _INPUTS or (name == "Out" and "v" not in on):
                types[name] = "*" + _TRITON_TYPES[dtype]
            else:
                types[name] = {"Ids": "*i32", "Pad": "*u8"}.get(name, "*fp32")
            attrs[(index,)] = [["tt.divisibility", 16]]  # torch's allocations are 16-byte aligned
        else:
            types[name] = {"scale": "fp32", "dropout_p": "fp32", "seed": "i64"}.get(name, "i32")
    return types, attrs


def _launch(kernel, programs: int, dtype: torch.dtype, **args) -> None:
    """Launch ``kernel`` on a 1D grid with the arguments it takes among ``args``."""
    names = set(kernel.arg_names)
    kernel[(programs,)](**{k: v for k, v in args.items() if k in names},
                        num_warps=num_warps(dtype, args["HEAD_DIM"]), num_stages=NUM_STAGES)


def kernel_ids(by_offset: List[Tensor], skip_id: int) -> Tensor:
    """The bucket ids as the kernels read them: ``(parts, (2h - 1) (2w - 1) + 2)`` int32, each row
    a part's :func:`offset_ids` flattened between two ``skip_id`` (the bucket of the pairs with a
    skip token, found at index 0, or at the last index for a term on queries)."""
    ids = torch.stack([t.flatten() for t in by_offset])
    ends = ids.new_full((ids.shape[0], 1), skip_id)
    return torch.cat([ends, ids, ends], dim=1).contiguous()


def _arguments(plan: Plan, sides: Dict[str, _Side], q: Tensor, k: Tensor, tables) -> Dict[str, object]:
    """Every kernel's arguments after its own tensors, and its flags."""
    B, H, L, D = q.shape
    some = next(iter(sides.values()), None)
    if some is not None:
        parts, buckets, grid = len(some.positions), some.buckets, plan.terms[some.positions[0]].grid
        ids = kernel_ids([plan.terms[p].ids for p in some.positions], skip_id=buckets - 1)
    else:  # attention without iRPE
        parts, buckets, grid, ids = 1, 0, (1, L), q.new_zeros(1, dtype=torch.int32)
    if plan.pad is not None:
        pad, pad_stride = plan.pad.reshape(B, L).to(torch.uint8).contiguous(), L
    else:
        pad, pad_stride = q.new_zeros(L, dtype=torch.uint8), 0
    src_q, sq_b, sq_h, sq_l = _source(sides.get("q"), k, tables, plan.scale)
    src_k, sk_b, sk_h, sk_l = _source(sides.get("k"), q, tables, plan.scale)
    return dict(Pad=pad, pad_stride=pad_stride, Ids=ids, SrcQ=src_q, sq_b=sq_b, sq_h=sq_h, sq_l=sq_l,
                SrcK=src_k, sk_b=sk_b, sk_h=sk_h, sk_l=sk_l, seq_len=L, heads=H, parts=parts, buckets=buckets,
                skip=L - grid[0] * grid[1], height=grid[0], width=grid[1], scale=plan.scale,
                dropout_p=float(plan.dropout), seed=int(plan.seed),
                **flags(q.dtype, D, plan.rows, "".join(sides), plan.dropout > 0))


class TritonRPEAttention(torch.autograd.Function):
    """:class:`.chunked.RowChunkedAttention` by the Triton kernels (their own dropout masks).

    Inputs: a :class:`.plan.Plan` from :func:`make_plan`, q, k, v ``(B, H, L, D)`` (float32,
    float16 or bfloat16; D 32 or 64) and the tables its terms name. Returns ``(B, H, L, D)``.
    """

    @staticmethod
    def forward(ctx, plan: Plan, q: Tensor, k: Tensor, v: Tensor, *tables: Tensor) -> Tensor:
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        B, H, L, D = q.shape
        sides = _sides(plan, tables)
        args = _arguments(plan, sides, q, k, tables)
        out = q.new_empty(B, H, L, D, dtype=torch.float32 if "v" in sides else q.dtype)
        lse = q.new_empty(B, H, L, dtype=torch.float32)
        programs = B * H * triton.cdiv(L, plan.rows)
        _launch(_forward_kernel, programs, q.dtype, Q=q, K=k, V=v, Out=out, Lse=lse, **args)
        mass = None
        if "v" in sides:  # out_i += sum_n M[i, n] rv[n]
            mass = q.new_zeros(B, H, L, args["parts"] * args["buckets"], dtype=torch.float32)
            _launch(_mass_kernel, programs, q.dtype, Q=q, K=k, Lse=lse, Mass=mass, **args)
            out = out.add_(torch.matmul(mass, sides["v"].table(tables))).to(q.dtype)
        ctx.plan = plan
        ctx.save_for_backward(q, k, v, out, lse, mass, *tables)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        plan: Plan = ctx.plan
        q, k, v, out, lse, mass, *tables = ctx.saved_tensors
        B, H, L, D = q.shape
        sides = _sides(plan, tables)
        args = _arguments(plan, sides, q, k, tables)
        do = grad_out.contiguous().to(q.dtype)
        delta = (do.float() * out.float()).sum(-1)  # sum_j p_ij dp_ij = dO_i . O_i
        nothing = q.new_zeros(1, dtype=torch.float32)
        buffers = {w: q.new_zeros(B, H, L, args["parts"] * args["buckets"], dtype=torch.float32) if w in sides
                   else nothing for w in "qk"}
        g = torch.matmul(do.float(), sides["v"].table(tables).transpose(-2, -1)) if "v" in sides else nothing
        grad_q, grad_k, grad_v = (torch.empty(B, H, L, D, dtype=torch.float32, device=q.device) for _ in range(3))
        programs = B * H * triton.cdiv(L, plan.rows)
        _launch(_dq_kernel, programs, q.dtype, Q=q, K=k, V=v, dO=do, Lse=lse, Delta=delta, dQ=grad_q,
                dSrcK=buffers["k"], G=g, **args)
        _launch(_dkdv_kernel, programs, q.dtype, Q=q, K=k, V=v, dO=do, Lse=lse, Delta=delta, dK=grad_k,
                dV=grad_v, dSrcQ=buffers["q"], G=g, **args)
        grad_tables: List[Optional[Tensor]] = [None] * len(tables)
        for which, side in sides.items():
            if which == "v":  # d rv[n] = sum_i M[i, n] dO_i
                grad = torch.matmul(mass.transpose(-2, -1), do.float()).sum(0)
            elif side.mode == "bias":
                grad = buffers[which].sum((0, 2))
            else:  # the buffer holds d(x @ table * scale) for x = q (on keys) or k (on queries)
                x, grad_x = (q, grad_q) if which == "k" else (k, grad_k)
                table, buffer = side.table(tables), buffers[which]
                grad_x.add_(torch.matmul(buffer, table.transpose(-2, -1)), alpha=plan.scale)
                grad = torch.matmul(x.float().transpose(-2, -1), buffer).sum(0).mul_(plan.scale)
            for position, g_table in side.gradients(grad, tables):
                grad_tables[position] = g_table
        dtype = q.dtype
        return (None, grad_q.to(dtype), grad_k.to(dtype), grad_v.to(dtype), *grad_tables)


def run(plan: Plan, q: Tensor, k: Tensor, v: Tensor, tables) -> Tensor:
    """:class:`TritonRPEAttention` of ``(B, H, L, D)`` q, k, v with the plan's ``tables``."""
    if q.dtype not in DTYPES:
        raise ValueError(f"rpe_impl='triton' takes {', '.join(map(str, DTYPES))} inputs, got {q.dtype}")
    reason = available(q.device.type)
    if reason is not None:
        raise RuntimeError(f"rpe_impl='triton': {reason}")
    return TritonRPEAttention.apply(plan, q, k, v, *tables)


# --------------------------------------------------------------------------------------------
# For tests: the kernels' dropout masks and bucket ids
# --------------------------------------------------------------------------------------------

def dropout_mask(p: float, seed: int, batch: int, heads: int, length: int, device="cpu") -> Tensor:
    """The multipliers (0 or ``1 / (1 - p)``) the kernels apply to the attention weights of a call
    with this dropout and seed, ``(batch, heads, length, length)`` float32."""
    out = torch.empty(batch, heads, length, length, dtype=torch.float32, device=device)
    block = BLOCKS[0]
    _dropout_mask_kernel[(batch * heads * triton.cdiv(length, block),)](out, length, float(p), int(seed), BLOCK=block)
    return out


def pair_ids(ids: Tensor, grid: Tuple[int, int], skip: int, skip_id: int, query_side: bool = False) -> Tensor:
    """The ``(L, L)`` bucket ids the kernels compute from :func:`offset_ids` ``ids`` for every pair:
    ``b(i, j)``, or ``b(j, i)`` at ``[i, j]`` for a term on queries."""
    length = skip + grid[0] * grid[1]
    out = torch.empty(length, length, dtype=torch.int32, device=ids.device)
    block = BLOCKS[0]
    _bucket_ids_kernel[(triton.cdiv(length, block),)](out, kernel_ids([ids], skip_id), length, skip, grid[0],
                                                       grid[1], QUERY_SIDE=query_side, BLOCK=block)
    return out
