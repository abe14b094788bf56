"""Bucket ids of 2D relative positions: the piecewise index function g(x) and the four methods.

For an ``H x W`` feature map flattened row-major into ``L = H*W`` tokens, token ``i`` sits at
``p_i = (row, col)``. The bucket of a pair ``(i, j)`` is a function of the offset ``p_i - p_j``:

* ``euc``      g(round(||p_i - p_j||_2)) + int(beta)                in [0, 2 int(beta)]
* ``quant``    g(||p_i - p_j||_2^2) + int(beta)                     in [0, 2 int(beta)]
* ``cross``    rows: g(dr) + int(beta), cols: g(dc) + int(beta)    two tables, summed
* ``product``  (g(dr) + int(beta)) * (2 int(beta)+1) + g(dc) + int(beta)

Arithmetic follows the iRPE release exactly (float32 logs, round-half-to-even, truncation),
so bucket ids agree with its model-zoo checkpoints bit for bit.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Optional, Tuple

import torch
from torch import Tensor

from .spec import num_buckets

# Table methods: "cross" is built from two tables, one on rows and one on columns.
TABLE_METHODS = ("euc", "quant", "product", "cross_rows", "cross_cols")


def piecewise_index(x: Tensor, alpha: float, beta: float, gamma: float) -> Tensor:
    """The piecewise index function g(x) of the paper (Eq. 18), elementwise.

    ``g(x) = round(x)`` for ``|x| <= alpha``, else
    ``sign(x) * min(beta, round(alpha + ln(|x|/alpha) / ln(gamma/alpha) * (beta - alpha)))``,
    truncated to an integer in ``[-int(beta), int(beta)]``.

    Args:
        x: integer or float tensor of any shape (relative positions or distances).
    Returns:
        long tensor of the same shape.
    """
    abs_x = x.abs()
    inside = abs_x <= alpha
    # The outside branch is computed on all elements (clamped so the log stays finite) and used
    # where ~inside; float32 like the release, so rounding ties break the same way.
    abs_f = abs_x if abs_x.is_floating_point() else abs_x.to(torch.float32)
    log_ratio = torch.log(abs_f.clamp(min=alpha) / alpha) / math.log(gamma / alpha)
    magnitude = (alpha + log_ratio * (beta - alpha)).round().clip(max=beta)
    outside = (torch.sign(x) * magnitude).to(torch.long)
    near = x.round().to(torch.long) if x.is_floating_point() else x.to(torch.long)
    return torch.where(inside, near, outside)


def _offsets(n: int, device) -> Tensor:
    """(n, n) matrix of ``a - b`` for positions a, b in [0, n)."""
    pos = torch.arange(n, device=device)
    return pos[:, None] - pos[None, :]


def bucket_factors(method: str, height: int, width: int, ratio: float,
                   device=None) -> Optional[Tuple[Tensor, Tensor, int]]:
    """The row and column parts of a separable method's bucket ids (no skip tokens).

    For ``product``, ``cross_rows`` and ``cross_cols``, returns ``(rows (H, H), cols (W, W), side)``
    with ``ids[(yi, xi), (yj, xj)] = rows[yi, yj] * side + cols[xi, xj]``, from which
    :func:`bucket_ids_2d` builds the ids of these methods; the fused kernel uses them to handle a
    query's keys row by row. None for ``euc`` and ``quant``, whose buckets depend on both offsets
    at once.
    """
    if method not in ("product", "cross_rows", "cross_cols"):
        return None
    alpha, beta, gamma = 1.0 * ratio, 2.0 * ratio, 8.0 * ratio
    beta_int = int(beta)
    rows = piecewise_index(_offsets(height, device), alpha, beta, gamma) + beta_int
    cols = piecewise_index(_offsets(width, device), alpha, beta, gamma) + beta_int
    if method == "cross_rows":
        return rows, torch.zeros_like(cols), 1
    if method == "cross_cols":
        return torch.zeros_like(rows), cols, 0
    return rows, cols, 2 * beta_int + 1


def bucket_ids_2d(method: str, height: int, width: int, ratio: float, skip: int = 0,
                  device=None) -> Tuple[Tensor, int]:
    """Bucket id of every pair of tokens on an ``height x width`` grid (plus ``skip`` leading tokens).

    Args:
        method: one of ``euc``, ``quant``, ``product``, ``cross_rows``, ``cross_cols``.
        ratio: alpha = ratio, beta = 2 ratio, gamma = 8 ratio.
        skip: extra tokens (e.g. a class token) placed before the image tokens; every pair that
            involves one of them gets the extra bucket id ``num_buckets``.
    Returns:
        ids: ``(skip + H*W, skip + H*W)`` long tensor, ``ids[i, j]`` = bucket of ``p_i - p_j``.
        num_buckets: number of distinct ids the table must hold (including the skip bucket).
    """
    if method not in TABLE_METHODS:
        raise ValueError(f"unknown bucket method {method!r}; expected one of {TABLE_METHODS}")
    if height <= 0 or width <= 0:
        raise ValueError(f"feature map size must be positive, got height={height}, width={width}")
    alpha, beta, gamma = 1.0 * ratio, 2.0 * ratio, 8.0 * ratio
    factors = bucket_factors(method, height, width, ratio, device)
    if factors is not None:  # product, cross: a row part and a column part
        rows, cols, side = factors
        ids = (rows[:, None, :, None] * side + cols[None, :, None, :]).expand(height, width, height, width)
    else:
        dr = _offsets(height, device)[:, None, :, None]  # (H, 1, H, 1): row_i - row_j
        dc = _offsets(width, device)[None, :, None, :]  # (1, W, 1, W): col_i - col_j
        squared = dr.square() + dc.square()
        dist = squared.float().sqrt().round() if method == "euc" else squared  # quant: squared distance
        ids = piecewise_index(dist, alpha, beta, gamma) + int(beta)
    L = height * width
    ids = ids.reshape(L, L)
    n = num_buckets("product" if method == "product" else "euc", beta)
    if skip > 0:
        full = torch.full((skip + L, skip + L), n, dtype=torch.long, device=device)
        full[skip:, skip:] = ids
        ids, n = full, n + 1
    return ids.contiguous(), n


def _check_fits(ids: Tensor, dtype: torch.dtype) -> None:
    """Refuse to narrow ``ids`` to an integer type that cannot hold them (they would wrap)."""
    if dtype != torch.long and ids.numel() and int(ids.max()) > torch.iinfo(dtype).max:
        raise ValueError(f"bucket ids up to {int(ids.max())} do not fit {dtype}")


class BucketCache:
    """A small LRU cache of bucket ids keyed by (method, ratio, H, W, skip, device).

    Owned by a model (or shared by the layers of one encoder), never global: the bucket ids of
    a feature-map size are computed once and reused by every layer and iteration.
    """

    def __init__(self, maxsize: int = 16):
        self.maxsize = maxsize
        self._store: "OrderedDict[tuple, dict]" = OrderedDict()

    def _entry(self, method: str, height: int, width: int, ratio: float, skip: int, device) -> dict:
        """The layouts cached for one feature map, keyed by layout; holds the plain ids at least."""
        key = (method, float(ratio), int(height), int(width), int(skip), torch.device(device))
        layouts = self._store.get(key)
        if layouts is None:
            ids, _ = bucket_ids_2d(method, height, width, ratio, skip, device=device)
            layouts = self._store[key] = {(False, torch.long): ids}
            if len(self._store) > self.maxsize:
                self._store.popitem(last=False)
        else:
            self._store.move_to_end(key)
        return layouts

    def get(self, method: str, height: int, width: int, ratio: float, skip: int, device,
            transposed: bool = False, dtype: torch.dtype = torch.long) -> Tensor:
        """``(L, L)`` ids ``b(i, j)``; ``transposed=True``: ``b(j, i)``, contiguous, as the fused kernel reads them."""
        layouts = self._entry(method, height, width, ratio, skip, device)
        ids = layouts.get((transposed, dtype))
        if ids is None:
            base = layouts[(False, torch.long)]
            _check_fits(base, dtype)
            ids = layouts[(transposed, dtype)] = (base.t() if transposed else base).to(dtype).contiguous()
        return ids

    def factors(self, method: str, height: int, width: int, ratio: float, skip: int, device,
                transposed: bool = False, dtype: torch.dtype = torch.long) -> Optional[Tuple[Tensor, Tensor, int]]:
        """:func:`bucket_factors` of a feature map (None with skip tokens), cached with its ids;
        ``transposed=True``: the factors of ``b(j, i)``."""
        layouts = self._entry(method, height, width, ratio, skip, device)
        key = ("factors", transposed, dtype)
        if key not in layouts:
            factors = bucket_factors(method, height, width, ratio, device) if skip == 0 else None
            if factors is not None:
                rows, cols, side = factors
                _check_fits(rows, dtype)
                _check_fits(cols, dtype)
                if transposed:
                    rows, cols = rows.t(), cols.t()
                factors = (rows.to(dtype).contiguous(), cols.to(dtype).contiguous(), side)
            layouts[key] = factors
        return layouts[key]

    def __len__(self) -> int:
        return len(self._store)

    def clear(self) -> None:
        self._store.clear()
