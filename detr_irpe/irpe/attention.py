"""Multi-head attention with iRPE: a drop-in for ``nn.MultiheadAttention`` as DETR's encoder uses it."""
from __future__ import annotations

import math
from typing import List, NamedTuple, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .buckets import BucketCache
from .spec import RPEConfig, as_rpe_config
from .tables import build_table

RPE_IMPLS = ("auto", "chunked", "sdpa")


class RPEMultiheadAttention(nn.Module):
    """Multi-head attention whose logits / outputs carry image relative position encodings.

    With ``rpe=None`` it computes exactly what ``nn.MultiheadAttention`` computes with the same
    weights. With an iRPE config (or spec string such as ``"rpe-2.0-product-ctx-1-k"``), for
    tokens ``i, j`` of the ``H x W`` feature map (row-major, padding included) and scaled
    queries ``q_i / sqrt(d)``:

    * on keys:    ``logit_ij += (q_i / sqrt(d)) . rk[b(i, j)]``   (or ``+= bk[b(i, j)]`` in bias mode)
    * on queries: ``logit_ij += (k_j / sqrt(d)) . rq[b(j, i)]``   (or ``+= bq[b(j, i)]``)
    * on values:  ``out_i    += sum_j a_ij rv[b(i, j)]``

    where ``b(i, j)`` is the bucket of ``p_i - p_j``. The query-side term indexes the bucket of
    ``p_j - p_i``, as the iRPE release does (its table is applied to keys and transposed).

    How it is computed (``rpe_impl``): without iRPE, ``F.scaled_dot_product_attention``. With
    iRPE, ``"sdpa"`` passes the additive terms to SDPA as a ``(B, H, L, L)`` float mask and forms
    the attention weights explicitly for an encoding on values; ``"chunked"`` walks over blocks
    of query rows and recomputes each block's logits in backward, so no ``(B, H, L, L)`` tensor
    is ever formed (faster and far smaller on CPU, where SDPA has no fused kernel for a mask
    that needs a gradient); ``"auto"`` (default) picks ``"chunked"`` on CPU, ``"sdpa"``
    elsewhere. ``need_weights=True`` or an ``attn_mask`` always takes the explicit / SDPA path.

    Args:
        embed_dim: model width ``C``.
        num_heads: number of heads ``H``; must divide ``embed_dim``.
        dropout: dropout on the attention weights.
        rpe: ``None``, an iRPE spec string or an :class:`RPEConfig`.
        bucket_cache: a :class:`BucketCache` to share between layers (one is made if not given).
        rpe_impl: ``"auto"``, ``"chunked"`` or ``"sdpa"`` (see above); the results agree.

    Attribute ``chunk_rows`` (default None: about 2**19 logits, at least 32 rows per block) sets
    the query rows per block of the chunked path.

    Parameters are named as in ``nn.MultiheadAttention`` (``in_proj_weight``, ``in_proj_bias``,
    ``out_proj``) plus ``rpe_q`` / ``rpe_k`` / ``rpe_v`` tables, so DETR and iRPE-DETR
    checkpoints load with ``strict=True``.
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0,
                 rpe: Union[None, str, RPEConfig] = None, bucket_cache: Optional[BucketCache] = None,
                 rpe_impl: str = "auto"):
        super().__init__()
        if rpe_impl not in RPE_IMPLS:
            raise ValueError(f"rpe_impl must be one of {RPE_IMPLS}, got {rpe_impl!r}")
        self.rpe_impl = rpe_impl
        self.chunk_rows: Optional[int] = None
        if num_heads <= 0 or embed_dim % num_heads != 0:
            raise ValueError(f"num_heads ({num_heads}) must be positive and divide embed_dim ({embed_dim})")
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.head_dim = embed_dim // num_heads
        self.dropout = dropout
        self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim))
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        self._reset_parameters()

        self.rpe_config = as_rpe_config(rpe)
        cfg = self.rpe_config
        for name in ("q", "k", "v"):
            table = None
            if cfg is not None and name in cfg.rpe_on:
                table = build_table(cfg, self.head_dim, num_heads, on_values=name == "v")
            setattr(self, f"rpe_{name}", table)
        self.bucket_cache = bucket_cache if bucket_cache is not None else BucketCache()

    def _reset_parameters(self) -> None:
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.in_proj_bias)
        nn.init.zeros_(self.out_proj.bias)

    def _project(self, query: Tensor, key: Tensor, value: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """In-projection; returns q, k, v as ``(B, H, L, D)``."""
        C = self.embed_dim
        w, b = self.in_proj_weight, self.in_proj_bias
        if query is key:
            q, k = F.linear(query, w[: 2 * C], b[: 2 * C]).chunk(2, dim=-1)
        else:
            q = F.linear(query, w[:C], b[:C])
            k = F.linear(key, w[C: 2 * C], b[C: 2 * C])
        v = F.linear(value, w[2 * C:], b[2 * C:])

        def heads(t: Tensor) -> Tensor:  # (L, B, C) -> (B, H, L, D)
            return t.reshape(t.shape[0], t.shape[1], self.num_heads, self.head_dim).permute(1, 2, 0, 3)

        return heads(q), heads(k), heads(v)

    def _bucket_lookup(self, hw: Optional[Tuple[int, int]], length: int, device):
        """Returns ``get_ids(method) -> (L, L)`` bucket ids for the current feature map, and its ``(H, W)``."""
        cfg = self.rpe_config
        if hw is None:
            side = math.isqrt(length - cfg.skip)
            if side * side != length - cfg.skip:
                raise ValueError(f"iRPE needs the feature-map size: pass hw=(H, W) "
                                 f"(sequence length {length} is not a square grid)")
            hw = (side, side)
        height, width = int(hw[0]), int(hw[1])
        if height * width + cfg.skip != length:
            raise ValueError(f"iRPE: hw={tuple(hw)} gives {height * width} image tokens + {cfg.skip} skip "
                             f"tokens, but the sequence has {length}; pass the feature map's (H, W) and set "
                             f"RPEConfig.skip to the number of extra tokens")

        def get_ids(method: str) -> Tensor:
            return self.bucket_cache.get(method, height, width, cfg.ratio, cfg.skip, device)

        return get_ids, (height, width)

    def forward(self, query: Tensor, key: Tensor, value: Tensor,
                key_padding_mask: Optional[Tensor] = None, attn_mask: Optional[Tensor] = None,
                hw: Optional[Tuple[int, int]] = None, need_weights: bool = False
                ) -> Tuple[Tensor, Optional[Tensor]]:
        """
        Args:
            query: ``(L, B, C)``; key, value: ``(S, B, C)`` (``S == L`` when iRPE is used).
            key_padding_mask: ``(B, S)`` bool, True where the key is padding.
            attn_mask: ``(L, S)`` or ``(B*H, L, S)``; bool (True = not allowed) or additive float.
            hw: ``(H, W)`` of the feature map the ``L`` tokens were flattened from (row-major).
            need_weights: also return the attention weights averaged over heads.
        Returns:
            output ``(L, B, C)`` and weights ``(B, L, S)`` or None.
        """
        L, B, C = query.shape
        S = key.shape[0]
        if C != self.embed_dim:
            raise ValueError(f"query has {C} channels, this attention was built for {self.embed_dim}")
        q, k, v = self._project(query, key, value)
        scale = self.head_dim ** -0.5

        get_ids = None
        bias = None  # additive logits, broadcastable to (B, H, L, S)
        p = self.dropout if self.training else 0.0
        if self.rpe_config is not None:
            if S != L:
                raise ValueError(f"iRPE is defined for self-attention; got {L} queries and {S} keys")
            get_ids, grid = self._bucket_lookup(hw, L, query.device)
            if self._row_chunks(q, need_weights, attn_mask):
                out = self._row_chunked(q, k, v, key_padding_mask, get_ids, grid, p)
                return self.out_proj(out.permute(2, 0, 1, 3).reshape(L, B, C)), None
            if self.rpe_k is not None:
                bias = self.rpe_k.logits(q * scale, get_ids)
            if self.rpe_q is not None:
                term = self.rpe_q.logits(k * scale, get_ids).transpose(-2, -1)
                bias = term if bias is None else bias + term
        bias = _merge_masks(bias, attn_mask, key_padding_mask, B, self.num_heads, L, S, q.dtype)

        if self.rpe_v is None and not need_weights:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=p)
            weights = None
        else:
            logits = torch.matmul(q * scale, k.transpose(-2, -1))
            if bias is not None:
                logits = logits + bias
            attn = F.dropout(logits.softmax(dim=-1), p=p, training=self.training)
            out = torch.matmul(attn, v)
            if self.rpe_v is not None:
                out = out + self.rpe_v.values(attn, get_ids)
            weights = attn.mean(dim=1) if need_weights else None
        out = out.permute(2, 0, 1, 3).reshape(L, B, C)
        return self.out_proj(out), weights

    def _row_chunks(self, q: Tensor, need_weights: bool, attn_mask: Optional[Tensor]) -> bool:
        """Whether this call takes the row-chunked path."""
        impl = self.rpe_impl
        if impl == "auto":
            impl = "chunked" if q.device.type == "cpu" else "sdpa"
        return (impl == "chunked" and not need_weights and attn_mask is None
                and q.dtype in (torch.float32, torch.float64))

    def _row_chunked(self, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor],
                     get_ids, grid: Tuple[int, int], dropout: float) -> Tensor:
        B, H, L, _ = q.shape
        cfg = self.rpe_config
        terms: List[_Term] = []
        tables: List[Tensor] = []
        for which in "qkv":
            module = getattr(self, f"rpe_{which}")
            if module is None:
                continue
            for table in (module.rp_rows, module.rp_cols) if hasattr(module, "rp_rows") else (module,):
                along = {"cross_rows": -1, "cross_cols": -2}.get(table.method, 0) if cfg.skip == 0 else 0
                terms.append(_Term(which, table.mode, get_ids(table.method), len(tables), grid, along))
                tables.append(table.lookup_table_bias if table.mode == "bias" else table.lookup_table_weight)
        pad = None
        if key_padding_mask is not None:
            if key_padding_mask.shape != (B, L):
                raise ValueError(f"key_padding_mask must be (B, S) = {(B, L)}, got {tuple(key_padding_mask.shape)}")
            if key_padding_mask.any():
                pad = key_padding_mask.view(B, 1, 1, L)
        seed = int(torch.randint(0, 2 ** 62, ())) if dropout > 0 else 0
        rows = self.chunk_rows or max(_MIN_ROWS, _CHUNK_ELEMENTS // (B * H * L))
        plan = _Plan(tuple(terms), self.head_dim ** -0.5, pad, dropout, seed, min(rows, L))
        return _RowChunkedRPEAttention.apply(plan, q, k, v, *tables)

    def extra_repr(self) -> str:
        rpe = self.rpe_config.spec if self.rpe_config is not None else None
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, dropout={self.dropout}, rpe={rpe}"


def _merge_masks(bias: Optional[Tensor], attn_mask: Optional[Tensor], key_padding_mask: Optional[Tensor],
                 batch: int, heads: int, L: int, S: int, dtype: torch.dtype) -> Optional[Tensor]:
    """Fold iRPE logits, ``attn_mask`` and ``key_padding_mask`` into one additive float mask.

    ``bias`` (the iRPE logits) is a tensor of this call's own, so padding is written into it in
    place when it already has the full ``(B, H, L, S)`` shape: no second ``(B, H, L, S)`` tensor.
    """
    owned = bias is not None
    if attn_mask is not None:
        if attn_mask.dim() == 3:
            if attn_mask.shape != (batch * heads, L, S):
                raise ValueError(f"3D attn_mask must be (B*H, L, S) = {(batch * heads, L, S)}, "
                                 f"got {tuple(attn_mask.shape)}")
            attn_mask = attn_mask.view(batch, heads, L, S)
        elif attn_mask.shape != (L, S):
            raise ValueError(f"2D attn_mask must be (L, S) = {(L, S)}, got {tuple(attn_mask.shape)}")
        if attn_mask.dtype == torch.bool:
            attn_mask = torch.zeros(attn_mask.shape, dtype=dtype, device=attn_mask.device).masked_fill(
                attn_mask, float("-inf"))
        owned = bias is not None or attn_mask.dtype != dtype
        bias = attn_mask.to(dtype) if bias is None else bias + attn_mask.to(dtype)
    if key_padding_mask is not None:
        if key_padding_mask.shape != (batch, S):
            raise ValueError(f"key_padding_mask must be (B, S) = {(batch, S)}, got {tuple(key_padding_mask.shape)}")
        pad = key_padding_mask.view(batch, 1, 1, S)
        if bias is None:
            bias = torch.zeros(pad.shape, dtype=dtype, device=pad.device).masked_fill(pad, float("-inf"))
        elif owned and bias.dtype == dtype and bias.shape == (batch, heads, L, S):
            bias = bias.masked_fill_(pad, float("-inf"))
        else:
            bias = bias.to(dtype).masked_fill(pad, float("-inf"))
    elif bias is not None:
        bias = bias.to(dtype)
    return bias


# ---------------------------------------------------------------------------------------------
# Row-chunked iRPE attention (the CPU fast path)
#
# An iRPE term on queries or keys makes every logit different, so a fused kernel needs it as
# a full (B, H, L, L) float mask, and on CPU SDPA has no fused kernel with a gradient for the
# mask: it falls back to its math path, which allocates several (B, H, L, L) tensors. Here the
# logits of a block of query rows are built in one reused buffer from per-bucket projections
# (never a per-pair table) and recomputed in backward from the saved log-sum-exp, as flash
# attention does. Memory: O(B H L (head_dim + num_buckets)) plus one (B, H, rows, L) block.
# ---------------------------------------------------------------------------------------------

# Rows per block: enough for about 2**19 logits (2 MiB in float32; fewer make Python's per-block
# overhead show), and at least 32 (thinner blocks make the matrix products slow). Measured on
# a 2-core CPU at DETR sizes; the buffers stay about twice the size of q.
_CHUNK_ELEMENTS = 1 << 19
_MIN_ROWS = 32


class _Term(NamedTuple):
    """One lookup table as the row-chunked kernel sees it.

    which: ``q``, ``k`` or ``v``; mode: ``bias`` or ``contextual``; ids: ``(L, L)`` bucket ids
    ``b(i, j)`` of the table's method; position: index of its parameter among the tables.
    grid, constant_along: for a ``cross`` table on an ``(h, w)`` grid without skip tokens, whose
    bucket depends on the row offset only (constant along key columns: -1) or on the column
    offset only (constant along key rows: -2); then the kernel gathers and scatters ``(n, h)``
    or ``(n, w)`` values per block, not ``(n, h * w)``.
    """
    which: str
    mode: str
    ids: Tensor
    position: int
    grid: Optional[Tuple[int, int]] = None
    constant_along: int = 0


class _Plan(NamedTuple):
    terms: Tuple[_Term, ...]
    scale: float
    pad: Optional[Tensor]  # (B, 1, 1, L) bool, True = padded key; None when no key is padded
    dropout: float
    seed: int  # of the dropout masks, so that backward draws the same ones
    rows: int  # query rows per block


def _sum_heads(grad: Tensor, table_heads: int) -> Tensor:
    """``(H, ...)`` per-head gradient, summed over heads for a table shared by all heads."""
    return grad.sum(0, keepdim=True) if table_heads == 1 else grad


def _generator(plan: _Plan, device) -> Optional[torch.Generator]:
    if plan.dropout == 0:
        return None
    return torch.Generator(device=device).manual_seed(plan.seed)


def _query_side_ids(term: _Term, r0: int, r1: int) -> Tensor:
    """``(n, L)`` bucket ids of query rows ``r0:r1``: ``b(i, j)``, or ``b(j, i)`` on the query side."""
    return term.ids[r0:r1] if term.which != "q" else term.ids[:, r0:r1].t()


def _key_projections(plan: _Plan, tables, k: Tensor) -> dict:
    """Contextual query-side terms: ``(k_j / sqrt(d)) . r[n]`` for every key and bucket, ``(B, H, L * nb)``."""
    B, H, L, _ = k.shape
    return {t.position: torch.matmul(k, tables[t.position]).mul_(plan.scale).reshape(B, H, -1)
            for t in plan.terms if t.which == "q" and t.mode == "contextual"}


def _block_ids(term: _Term, r0: int, r1: int) -> Tuple[Tensor, int]:
    """Bucket ids of the pairs of query rows ``r0:r1`` as the kernel indexes them.

    Returns ``(ids, along)``: ``(n, L)`` ids and 0, or for a term constant along key rows / columns
    (see :class:`_Term`) ``(n, h)`` / ``(n, w)`` ids and the grid dimension (-1 / -2) to spread over.
    A contextual term on queries depends on the key itself and is never compacted.
    """
    ids = _query_side_ids(term, r0, r1)
    if term.constant_along == 0 or (term.which == "q" and term.mode == "contextual"):
        return ids, 0
    ids = ids.reshape(-1, *term.grid)
    return (ids[:, :, 0], -1) if term.constant_along == -1 else (ids[:, 0, :], -2)


def _write(out: Tensor, x: Tensor, term: _Term, along: int, add: bool) -> None:
    """``out (B, H, n, L)`` = (or +=) values on :func:`_block_ids`'s pairs, ``(b, h, n, L or m)``."""
    if along != 0:
        out, x = out.view(*out.shape[:3], *term.grid), x.unsqueeze(along)
    if add:
        out.add_(x)
    else:
        out.copy_(x)


def _collapse(x: Tensor, term: _Term, along: int) -> Tensor:
    """``(b, h, n, L)`` per-pair values summed onto :func:`_block_ids`'s pairs ``(b, h, n, m)``."""
    return x if along == 0 else x.view(*x.shape[:3], *term.grid).sum(along)


def _bucket_sums(x: Tensor, term: _Term, r0: int, r1: int, num_buckets: int) -> Tensor:
    """``out[b, h, i, n] = sum_j x[b, h, i, j] [b(i, j) = n]`` for ``(B, H, n, L)`` pairs of rows ``r0:r1``."""
    ids, along = _block_ids(term, r0, r1)
    B, H, n, _ = x.shape
    return x.new_zeros(B, H, n, num_buckets).scatter_add_(3, ids.expand(B, H, n, ids.shape[1]),
                                                         _collapse(x, term, along))


def _flat_ids(ids: Tensor, num_buckets: int) -> Tensor:
    """``j * nb + b`` for ``(n, L)`` ids: positions in a ``(L * nb)`` row of key projections."""
    L = ids.shape[1]
    return ids + torch.arange(0, L * num_buckets, num_buckets, device=ids.device)


def _block_logits(plan: _Plan, tables, q: Tensor, kT: Tensor, key_proj: dict, pad: Optional[Tensor],
                  r0: int, r1: int, out: Tensor) -> Tensor:
    """Logits of query rows ``r0:r1`` written into ``out`` ``(B, H, n, L)``; returns ``out``.

    ``pad``: ``(B, 1, 1, L)``, 0 or -inf on padded keys.
    """
    B, H, n, L = out.shape
    first = True  # the first term is written into ``out``, later ones are added to it
    for term in plan.terms:
        if term.which == "v":
            continue
        table, (ids, along) = tables[term.position], _block_ids(term, r0, r1)
        if term.mode == "bias":  # r[h, b]: table (heads, nb), broadcast over the batch
            heads = table.shape[0]
            if first and along == 0:
                source = table.unsqueeze(0).expand(B, H, -1)
                torch.gather(source, 2, ids.reshape(1, 1, -1).expand(B, H, -1), out=out.view(B, H, n * L))
                first = False
                continue
            index = ids.reshape(1, 1, -1).expand(1, heads, -1)
            values = torch.gather(table.unsqueeze(0), 2, index).view(1, heads, n, -1)
        elif term.which == "k":  # (q_i / sqrt(d)) . r[b(i, j)]: the block's queries on every bucket
            per_bucket = torch.matmul(q[:, :, r0:r1], table).mul_(plan.scale)  # (B, H, n, nb)
            index = ids.expand(B, H, n, ids.shape[1])
            if first and along == 0:
                torch.gather(per_bucket, 3, index, out=out)
                first = False
                continue
            values = torch.gather(per_bucket, 3, index)
        else:  # (k_j / sqrt(d)) . r[b(j, i)] from the (B, H, L * nb) key projections
            index = _flat_ids(ids, table.shape[-1]).reshape(1, 1, -1).expand(B, H, -1)
            if first:
                torch.gather(key_proj[term.position], 2, index, out=out.view(B, H, n * L))
                first = False
                continue
            values = torch.gather(key_proj[term.position], 2, index).view(B, H, n, L)
        _write(out, values, term, along, add=not first)
        first = False
    out3, q3, kT3 = out.view(B * H, n, L), q[:, :, r0:r1].reshape(B * H, n, -1), kT.reshape(B * H, -1, L)
    if first:
        torch.bmm(q3, kT3, out=out3).mul_(plan.scale)
    else:
        out3.baddbmm_(q3, kT3, alpha=plan.scale)
    if pad is not None:
        out.add_(pad)
    return out


def _padding(plan: _Plan, dtype) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """``(B, 1, 1, L)`` additive mask (-inf on padded keys) and multiplicative one (0 on them)."""
    if plan.pad is None:
        return None, None
    keep = (~plan.pad).to(dtype)
    return torch.zeros_like(keep).masked_fill_(plan.pad, float("-inf")), keep


def _exp_(x: Tensor, keep: Optional[Tensor]) -> Tensor:
    """``exp`` in place, for logits already shifted by their row maximum.

    Arguments below the log of the smallest normal number are raised to it first: exp would
    return subnormal numbers there, which x86 CPUs compute over a hundred times more slowly, and
    which are smaller than the row's largest term (exp(0) = 1) by far more than the precision.
    Padded keys (-inf) are then set to exactly 0 by ``keep``.
    """
    x.clamp_(min=math.ceil(math.log(torch.finfo(x.dtype).tiny))).exp_()
    return x.mul_(keep) if keep is not None else x


class _RowChunkedRPEAttention(torch.autograd.Function):
    """``softmax(q k^T / sqrt(d) + iRPE + padding)`` applied to ``v`` (+ iRPE on values), by row blocks.

    Inputs: a :class:`_Plan`, q, k, v ``(B, H, L, D)`` and the tables its terms name: bias
    ``(heads, nb)``, contextual on q / k ``(heads, D, nb)``, on values ``(heads, nb, D)``.
    Returns ``(B, H, L, D)``.
    """

    @staticmethod
    def forward(ctx, plan: _Plan, q: Tensor, k: Tensor, v: Tensor, *tables: Tensor) -> Tensor:
        B, H, L, D = q.shape
        ctx.table_dtypes = [t.dtype for t in tables]
        tables = tuple(t.to(q.dtype) for t in tables)
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        kT = k.transpose(-2, -1)
        key_proj = _key_projections(plan, tables, k)
        out = q.new_empty(B, H, L, D)
        lse = q.new_empty(B, H, L, 1)
        buf = q.new_empty(B * H * plan.rows * L)
        keep = q.new_empty(B * H * plan.rows * L) if plan.dropout > 0 else None
        gen = _generator(plan, q.device)
        pad, keep_keys = _padding(plan, q.dtype)
        for r0 in range(0, L, plan.rows):
            r1 = min(L, r0 + plan.rows)
            size = B * H * (r1 - r0) * L
            s = _block_logits(plan, tables, q, kT, key_proj, pad, r0, r1, buf[:size].view(B, H, r1 - r0, L))
            m = s.amax(dim=-1, keepdim=True)
            _exp_(s.sub_(m), keep_keys)  # unnormalised probabilities; normalised on the (n, D) result
            denom = s.sum(dim=-1, keepdim=True)
            lse[:, :, r0:r1] = m + denom.log()
            if keep is not None:
                s.mul_(keep[:size].view_as(s).bernoulli_(1.0 - plan.dropout, generator=gen))
                denom = denom * (1.0 - plan.dropout)
            block = torch.matmul(s, v)
            for term in plan.terms:
                if term.which == "v":  # sum_j a_ij r[b(i, j)] = (attention mass per bucket) @ table
                    block += torch.matmul(_bucket_sums(s, term, r0, r1, tables[term.position].shape[1]),
                                          tables[term.position])
            torch.div(block, denom, out=block)
            out[:, :, r0:r1] = block
        ctx.plan = plan
        ctx.save_for_backward(q, k, v, out, lse, *tables)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        plan: _Plan = ctx.plan
        q, k, v, out, lse, *tables = ctx.saved_tensors
        B, H, L, D = q.shape
        grad_out = grad_out.contiguous()
        kT, vT = k.transpose(-2, -1), v.transpose(-2, -1)
        key_proj = _key_projections(plan, tables, k)
        delta = (grad_out * out).sum(dim=-1, keepdim=True)  # sum_j p_ij dp_ij = dO_i . O_i
        grad_qs, grad_k, grad_v = torch.empty_like(q), torch.zeros_like(k), torch.zeros_like(v)
        grad_tables = [torch.zeros_like(t) for t in tables]
        grad_key_proj = {pos: torch.zeros_like(x) for pos, x in key_proj.items()}
        grad_bias = {t.position: q.new_zeros(B, H, tables[t.position].shape[-1])  # per batch and head
                     for t in plan.terms if t.mode == "bias" and t.constant_along == 0}
        buf, grad_buf = q.new_empty(B * H * plan.rows * L), q.new_empty(B * H * plan.rows * L)
        keep = q.new_empty(B * H * plan.rows * L) if plan.dropout > 0 else None
        gen = _generator(plan, q.device)
        pad, keep_keys = _padding(plan, q.dtype)
        for r0 in range(0, L, plan.rows):
            r1 = min(L, r0 + plan.rows)
            n, size = r1 - r0, B * H * (r1 - r0) * L
            p = _block_logits(plan, tables, q, kT, key_proj, pad, r0, r1, buf[:size].view(B, H, n, L))
            _exp_(p.sub_(lse[:, :, r0:r1]), keep_keys)  # probabilities
            g_out = grad_out[:, :, r0:r1]
            dp = grad_buf[:size].view(B, H, n, L)
            z, a = None, p
            if keep is not None:  # the forward's masks: same generator, same order
                z = keep[:size].view(B, H, n, L).bernoulli_(1.0 - plan.dropout, generator=gen)
                z.mul_(1.0 / (1.0 - plan.dropout))
                a = torch.mul(p, z, out=dp)  # dropped-out weights; dp is free until below
            grad_v += torch.matmul(a.transpose(-2, -1), g_out)
            for term in plan.terms:
                if term.which == "v":
                    table = tables[term.position]
                    mass = _bucket_sums(a, term, r0, r1, table.shape[1])
                    grad = torch.matmul(mass.transpose(-2, -1), g_out).sum(0)  # (H, nb, D)
                    grad_tables[term.position] += _sum_heads(grad, table.shape[0])
            torch.matmul(g_out, vT, out=dp)  # d a_ij = dO_i . v_j
            for term in plan.terms:
                if term.which == "v":  # + dO_i . r[b(i, j)]
                    per_bucket = torch.matmul(g_out, tables[term.position].transpose(-2, -1))
                    ids, along = _block_ids(term, r0, r1)
                    _write(dp, torch.gather(per_bucket, 3, ids.expand(B, H, n, ids.shape[1])), term, along, add=True)
            if z is not None:
                dp.mul_(z)
            ds = dp.sub_(delta[:, :, r0:r1]).mul_(p)  # gradient of the logits
            grad_q_block = torch.matmul(ds, k)
            grad_k += torch.matmul(ds.transpose(-2, -1), q[:, :, r0:r1])
            for term in plan.terms:
                if term.which == "v":
                    continue
                table, (ids, along) = tables[term.position], _block_ids(term, r0, r1)
                if term.mode == "bias" and along == 0:  # straight from ds: no (H, n, L) temporary
                    grad_bias[term.position].scatter_add_(2, ids.reshape(1, 1, -1).expand(B, H, -1),
                                                          ds.view(B, H, -1))
                elif term.mode == "bias":
                    heads = table.shape[0]
                    grad = _sum_heads(_collapse(ds, term, along).sum(0), heads)  # (heads, n, m)
                    grad_tables[term.position].scatter_add_(1, ids.reshape(1, -1).expand(heads, -1),
                                                            grad.reshape(heads, -1))
                elif term.which == "k":
                    grad = _bucket_sums(ds, term, r0, r1, table.shape[-1])
                    grad_q_block += torch.matmul(grad, table.transpose(-2, -1))
                    grad_table = torch.matmul(q[:, :, r0:r1].transpose(-2, -1), grad).sum(0)  # (H, D, nb)
                    grad_tables[term.position] += _sum_heads(grad_table, table.shape[0]).mul_(plan.scale)
                else:
                    index = _flat_ids(ids, table.shape[-1]).reshape(1, 1, -1).expand(B, H, -1)
                    grad_key_proj[term.position].scatter_add_(2, index, ds.reshape(B, H, -1))
            grad_qs[:, :, r0:r1] = grad_q_block
        for pos, grad in grad_bias.items():
            grad_tables[pos] += _sum_heads(grad.sum(0), tables[pos].shape[0])
        for term in plan.terms:
            if term.position in grad_key_proj:
                table = tables[term.position]
                grad = grad_key_proj[term.position].view(B, H, L, table.shape[-1])
                grad_k += torch.matmul(grad, table.transpose(-2, -1))
                grad_table = torch.matmul(k.transpose(-2, -1), grad).sum(0)  # (H, D, nb)
                grad_tables[term.position] += _sum_heads(grad_table, table.shape[0]).mul_(plan.scale)
        # logits = (q s) . k + ...: grad_qs and grad_k hold the gradients w.r.t. q s and k s
        grad_k.mul_(plan.scale)
        grad_tables = [g.to(dt) for g, dt in zip(grad_tables, ctx.table_dtypes)]
        return (None, grad_qs.mul_(plan.scale), grad_k, grad_v, *grad_tables)
