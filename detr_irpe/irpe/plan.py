"""The plan of one attention call, shared by the blockwise kernels (:mod:`.chunked`, :mod:`.native`,
:mod:`.triton_kernel`): each kernel's ``make_plan`` fills it in the layout it reads, its ``run``
executes it."""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

from torch import Tensor


class Term(NamedTuple):
    """One lookup table of an iRPE encoding, as a kernel sees it.

    which: ``q``, ``k`` or ``v``; mode: ``bias`` or ``contextual``; position: index of its
    parameter among the tables. ids: the table method's bucket ids in the kernel's layout:

    * :mod:`.chunked`: ``(L, L)`` long, ``b(i, j)``;
    * :mod:`.native`: ``(L, L)`` int16, transposed (``b(j, i)``) for a term on queries;
    * :mod:`.triton_kernel`: ``(2 h - 1, 2 w - 1)`` int32 ids by offset on the ``(h, w)`` grid,
      ``ids[dr + h - 1, dc + w - 1]`` = bucket of ``(dr, dc)`` (skip tokens by rule, not stored).

    grid: the ``(h, w)`` feature map. constant_along (row-chunked kernel): for a ``cross`` table
    without skip tokens, whose bucket depends on the row offset only (constant along key columns:
    -1) or on the column offset only (constant along key rows: -2); then the kernel gathers and
    scatters ``(n, h)`` or ``(n, w)`` values per block, not ``(n, h * w)``. factors (compiled CPU
    kernel): the separable ids of ``product`` / ``cross``, see :func:`.buckets.bucket_factors`.
    """
    which: str
    mode: str
    ids: Tensor
    position: int
    grid: Optional[Tuple[int, int]] = None
    constant_along: int = 0
    factors: Optional[Tuple[Tensor, Tensor, int]] = None


class Plan(NamedTuple):
    """One attention call: a :class:`Term` per lookup table, the logits' scale (``head_dim ** -0.5``),
    the key padding, dropout and the seed of its masks, and the query rows per block."""
    terms: Tuple[Term, ...]
    scale: float
    pad: Optional[Tensor]  # (B, 1, 1, L) bool, True = padded key; None when no key is padded
    dropout: float
    seed: int  # of the dropout masks, so that backward draws the same ones
    rows: int  # query rows per block (the Triton kernel: tokens per block, queries and keys)


def sum_heads(grad: Tensor, table_heads: int) -> Tensor:
    """``(H, ...)`` per-head gradient, summed over heads for a table shared by all heads."""
    return grad.sum(0, keepdim=True) if table_heads == 1 else grad
