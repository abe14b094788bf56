"""Row-chunked iRPE attention in pure PyTorch: the fallback wherever the fused kernel
(:mod:`.native`) cannot be built, and ``rpe_impl="chunked"``.

An iRPE term on queries or keys makes every logit different, so a fused kernel needs it as
a full (B, H, L, L) float mask, and on CPU SDPA has no fused kernel with a gradient for the
mask: it falls back to its math path, which allocates several (B, H, L, L) tensors. Here the
logits of a block of query rows are built in one reused buffer from per-bucket projections
(never a per-pair table) and recomputed in backward from the saved log-sum-exp, as flash
attention does. Memory: O(B H L (head_dim + num_buckets)) plus one (B, H, rows, L) block.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor

from .plan import Plan, Term, sum_heads

# Rows per block: enough for about 2**19 logits (2 MiB in float32; fewer make Python's per-block
# overhead show), and at least 32 (thinner blocks make the matrix products slow). Measured on
# a 2-core CPU at DETR sizes; the buffers stay about twice the size of q.
CHUNK_ELEMENTS = 1 << 19
MIN_ROWS = 32


def make_plan(tables, get_ids, grid: Tuple[int, int], skip: int, shape: Tuple[int, ...], scale: float,
              pad: Optional[Tensor], dropout: float, seed: int, rows: Optional[int] = None) -> Plan:
    """The plan of one call: a :class:`Term` per ``(which, RPETable)`` of ``tables``, bucket ids from
    ``get_ids(method)``, and ``rows`` query rows per block (None: chosen from ``shape`` ``(B, H, L, D)``)."""
    B, H, L, _ = shape
    terms = []
    for position, (which, table) in enumerate(tables):
        along = {"cross_rows": -1, "cross_cols": -2}.get(table.method, 0) if skip == 0 else 0
        terms.append(Term(which, table.mode, get_ids(table.method), position, grid, along))
    rows = rows or max(MIN_ROWS, CHUNK_ELEMENTS // (B * H * L))
    return Plan(tuple(terms), scale, pad, dropout, seed, min(rows, L))


def run(plan: Plan, q: Tensor, k: Tensor, v: Tensor, tables) -> Tensor:
    """:class:`RowChunkedAttention` of ``(B, H, L, D)`` q, k, v with the plan's ``tables``."""
    return RowChunkedAttention.apply(plan, q, k, v, *tables)


def _generator(plan: Plan, device) -> Optional[torch.Generator]:
    if plan.dropout == 0:
        return None
    return torch.Generator(device=device).manual_seed(plan.seed)


def _query_side_ids(term: Term, r0: int, r1: int) -> Tensor:
    """``(n, L)`` bucket ids of query rows ``r0:r1``: ``b(i, j)``, or ``b(j, i)`` on the query side."""
    return term.ids[r0:r1] if term.which != "q" else term.ids[:, r0:r1].t()


def _key_projections(plan: Plan, tables, k: Tensor) -> dict:
    """Contextual query-side terms: ``(k_j / sqrt(d)) . r[n]`` for every key and bucket, ``(B, H, L * nb)``."""
    B, H, L, _ = k.shape
    return {t.position: torch.matmul(k, tables[t.position]).mul_(plan.scale).reshape(B, H, -1)
            for t in plan.terms if t.which == "q" and t.mode == "contextual"}


def _block_ids(term: Term, r0: int, r1: int) -> Tuple[Tensor, int]:
    """Bucket ids of the pairs of query rows ``r0:r1`` as the kernel indexes them.

    Returns ``(ids, along)``: ``(n, L)`` ids and 0, or for a term constant along key rows / columns
    (see :class:`Term`) ``(n, h)`` / ``(n, w)`` ids and the grid dimension (-1 / -2) to spread over.
    A contextual term on queries depends on the key itself and is never compacted.
    """
    ids = _query_side_ids(term, r0, r1)
    if term.constant_along == 0 or (term.which == "q" and term.mode == "contextual"):
        return ids, 0
    ids = ids.reshape(-1, *term.grid)
    return (ids[:, :, 0], -1) if term.constant_along == -1 else (ids[:, 0, :], -2)


def _write(out: Tensor, x: Tensor, term: Term, along: int, add: bool) -> None:
    """``out (B, H, n, L)`` = (or +=) values on :func:`_block_ids`'s pairs, ``(b, h, n, L or m)``."""
    if along != 0:
        out, x = out.view(*out.shape[:3], *term.grid), x.unsqueeze(along)
    if add:
        out.add_(x)
    else:
        out.copy_(x)


def _collapse(x: Tensor, term: Term, along: int) -> Tensor:
    """``(b, h, n, L)`` per-pair values summed onto :func:`_block_ids`'s pairs ``(b, h, n, m)``."""
    return x if along == 0 else x.view(*x.shape[:3], *term.grid).sum(along)


def _bucket_sums(x: Tensor, term: Term, r0: int, r1: int, num_buckets: int) -> Tensor:
    """``out[b, h, i, n] = sum_j x[b, h, i, j] [b(i, j) = n]`` for ``(B, H, n, L)`` pairs of rows ``r0:r1``."""
    ids, along = _block_ids(term, r0, r1)
    B, H, n, _ = x.shape
    return x.new_zeros(B, H, n, num_buckets).scatter_add_(3, ids.expand(B, H, n, ids.shape[1]),
                                                         _collapse(x, term, along))


def _flat_ids(ids: Tensor, num_buckets: int) -> Tensor:
    """``j * nb + b`` for ``(n, L)`` ids: positions in a ``(L * nb)`` row of key projections."""
    L = ids.shape[1]
    return ids + torch.arange(0, L * num_buckets, num_buckets, device=ids.device)


def _block_logits(plan: Plan, tables, q: Tensor, kT: Tensor, key_proj: dict, pad: Optional[Tensor],
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


def _padding(plan: Plan, dtype) -> Tuple[Optional[Tensor], Optional[Tensor]]:
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


class RowChunkedAttention(torch.autograd.Function):
    """``softmax(q k^T / sqrt(d) + iRPE + padding)`` applied to ``v`` (+ iRPE on values), by row blocks.

    Inputs: a :class:`Plan`, q, k, v ``(B, H, L, D)`` and the tables its terms name: bias
    ``(heads, nb)``, contextual on q / k ``(heads, D, nb)``, on values ``(heads, nb, D)``.
    Returns ``(B, H, L, D)``.
    """

    @staticmethod
    def forward(ctx, plan: Plan, q: Tensor, k: Tensor, v: Tensor, *tables: Tensor) -> Tensor:
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
        plan: Plan = ctx.plan
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
                    grad_tables[term.position] += sum_heads(grad, table.shape[0])
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
                    grad = sum_heads(_collapse(ds, term, along).sum(0), heads)  # (heads, n, m)
                    grad_tables[term.position].scatter_add_(1, ids.reshape(1, -1).expand(heads, -1),
                                                            grad.reshape(heads, -1))
                elif term.which == "k":
                    grad = _bucket_sums(ds, term, r0, r1, table.shape[-1])
                    grad_q_block += torch.matmul(grad, table.transpose(-2, -1))
                    grad_table = torch.matmul(q[:, :, r0:r1].transpose(-2, -1), grad).sum(0)  # (H, D, nb)
                    grad_tables[term.position] += sum_heads(grad_table, table.shape[0]).mul_(plan.scale)
                else:
                    index = _flat_ids(ids, table.shape[-1]).reshape(1, 1, -1).expand(B, H, -1)
                    grad_key_proj[term.position].scatter_add_(2, index, ds.reshape(B, H, -1))
            grad_qs[:, :, r0:r1] = grad_q_block
        for pos, grad in grad_bias.items():
            grad_tables[pos] += sum_heads(grad.sum(0), tables[pos].shape[0])
        for term in plan.terms:
            if term.position in grad_key_proj:
                table = tables[term.position]
                grad = grad_key_proj[term.position].view(B, H, L, table.shape[-1])
                grad_k += torch.matmul(grad, table.transpose(-2, -1))
                grad_table = torch.matmul(k.transpose(-2, -1), grad).sum(0)  # (H, D, nb)
                grad_tables[term.position] += sum_heads(grad_table, table.shape[0]).mul_(plan.scale)
        # logits = (q s) . k + ...: grad_qs and grad_k hold the gradients w.r.t. q s and k s
        grad_k.mul_(plan.scale)
        grad_tables = [g.to(dt) for g, dt in zip(grad_tables, ctx.table_dtypes)]
        return (None, grad_qs.mul_(plan.scale), grad_k, grad_v, *grad_tables)
