"""Learned iRPE lookup tables and how they enter the attention.

Parameter names and shapes follow the iRPE release so its checkpoints load with ``strict=True``:

* on queries / keys, bias mode:       ``lookup_table_bias``   ``(heads, num_buckets)``
* on queries / keys, contextual mode: ``lookup_table_weight`` ``(heads, head_dim, num_buckets)``
* on values (contextual only):        ``lookup_table_weight`` ``(heads, num_buckets, head_dim)``

``heads`` is 1 when the table is shared by all heads. The ``cross`` method holds two tables,
``rp_rows`` and ``rp_cols``, whose contributions are summed.
"""
from __future__ import annotations

from typing import Callable, Tuple

import torch
from torch import Tensor, nn

from .spec import RPEConfig

# get_ids(table_method) -> (L, L) long bucket ids of the current feature map
BucketLookup = Callable[[str], Tensor]


class RPETable(nn.Module):
    """One lookup table of a bucketed relative position encoding.

    Args:
        method: bucket method of this table (``euc``, ``quant``, ``product``, ``cross_rows``, ``cross_cols``).
        mode: ``bias`` or ``contextual``.
        num_buckets: table size (including the skip-token bucket).
        head_dim: channels per head.
        num_heads: 1 for a table shared by all heads, else the number of heads.
        on_values: a table on values (``(heads, num_buckets, head_dim)``) rather than on queries/keys.
    """

    def __init__(self, method: str, mode: str, num_buckets: int, head_dim: int, num_heads: int,
                 on_values: bool = False):
        super().__init__()
        self.method, self.mode = method, mode
        self.num_buckets, self.head_dim, self.num_heads = num_buckets, head_dim, num_heads
        self.on_values = on_values
        if on_values:
            if mode != "contextual":
                raise ValueError("an iRPE table on values must be contextual")
            self.lookup_table_weight = nn.Parameter(torch.zeros(num_heads, num_buckets, head_dim))
        elif mode == "bias":
            self.lookup_table_bias = nn.Parameter(torch.zeros(num_heads, num_buckets))
        else:
            self.lookup_table_weight = nn.Parameter(torch.zeros(num_heads, head_dim, num_buckets))

    def parts(self) -> Tuple["RPETable", ...]:
        """The tables whose terms are summed: this one (``CrossRPETable`` has two)."""
        return (self,)

    @property
    def lookup_table(self) -> Tensor:
        """The learned parameter: ``lookup_table_bias`` in bias mode, else ``lookup_table_weight``."""
        return self.lookup_table_bias if self.mode == "bias" else self.lookup_table_weight

    def logits(self, x: Tensor, get_ids: BucketLookup) -> Tensor:
        """Additive attention logits of an encoding on keys (or, transposed by the caller, queries).

        Args:
            x: ``(B, H, L, D)`` the other side of the dot product (the scaled queries for an
                encoding on keys, the scaled keys for one on queries).
        Returns:
            ``out[b, h, i, j] = x[b, h, i] . r[h, bucket(i, j)]`` of shape ``(B, H, L, L)``,
            or ``r[h, bucket(i, j)]`` of shape ``(1, heads, L, L)`` in bias mode.
        """
        ids = get_ids(self.method)
        if self.mode == "bias":
            return self.lookup_table_bias[:, ids].unsqueeze(0)
        # project every token onto every bucket first: (B, H, L, num_buckets), cheap since
        # num_buckets << L; then pick each pair's bucket. No (L, L, D) tensor is formed.
        per_bucket = torch.matmul(x, self.lookup_table_weight.to(x.dtype))
        B, H, L, _ = per_bucket.shape
        return torch.gather(per_bucket, 3, ids.expand(B, H, L, ids.shape[1]))

    def values(self, attn: Tensor, get_ids: BucketLookup) -> Tensor:
        """Encoding on values: ``out[b, h, i] = sum_j attn[b, h, i, j] r[h, bucket(i, j)]``.

        Args:
            attn: ``(B, H, L, L)`` attention weights (after softmax and dropout).
        Returns:
            ``(B, H, L, D)``. The weights are first summed per bucket, ``(B, H, L, num_buckets)``,
            then multiplied with the table.
        """
        ids = get_ids(self.method)
        B, H, L, S = attn.shape
        per_bucket = attn.new_zeros(B, H, L, self.num_buckets)
        per_bucket = per_bucket.scatter_add(3, ids.expand(B, H, L, S), attn)
        return torch.matmul(per_bucket, self.lookup_table_weight.to(attn.dtype))

    def extra_repr(self) -> str:
        where = "values" if self.on_values else "queries/keys"
        return (f"method={self.method}, mode={self.mode}, num_buckets={self.num_buckets}, "
                f"heads={self.num_heads}, head_dim={self.head_dim}, on={where}")


class CrossRPETable(nn.Module):
    """The ``cross`` method: one table on row offsets and one on column offsets, summed."""

    def __init__(self, mode: str, num_buckets: int, head_dim: int, num_heads: int, on_values: bool = False):
        super().__init__()
        self.rp_rows = RPETable("cross_rows", mode, num_buckets, head_dim, num_heads, on_values)
        self.rp_cols = RPETable("cross_cols", mode, num_buckets, head_dim, num_heads, on_values)

    def parts(self) -> Tuple[RPETable, RPETable]:
        """The row table and the column table."""
        return self.rp_rows, self.rp_cols

    def logits(self, x: Tensor, get_ids: BucketLookup) -> Tensor:
        return self.rp_rows.logits(x, get_ids) + self.rp_cols.logits(x, get_ids)

    def values(self, attn: Tensor, get_ids: BucketLookup) -> Tensor:
        return self.rp_rows.values(attn, get_ids) + self.rp_cols.values(attn, get_ids)


def build_table(cfg: RPEConfig, head_dim: int, num_heads: int, on_values: bool) -> nn.Module:
    """The table (or pair of tables for ``cross``) of one of q / k / v."""
    heads = 1 if cfg.shared_head else num_heads
    if cfg.method == "cross":
        return CrossRPETable(cfg.mode, cfg.num_buckets, head_dim, heads, on_values)
    return RPETable(cfg.method, cfg.mode, cfg.num_buckets, head_dim, heads, on_values)
