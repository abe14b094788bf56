"""Slow, obviously-correct iRPE references used by the tests: plain Python loops and einsums.

Written from the paper's definitions and the release's documented semantics, independently
of ``detr_irpe.irpe``'s vectorised code.
"""
import math

import torch


def g_ref(x: float, ratio: float) -> int:
    """Piecewise index function (paper Eq. 18), one number at a time."""
    alpha, beta, gamma = ratio, 2 * ratio, 8 * ratio
    if abs(x) <= alpha:
        return int(round(x))  # Python rounds half to even, like torch.round
    magnitude = round(alpha + math.log(abs(x) / alpha) / math.log(gamma / alpha) * (beta - alpha))
    magnitude = min(magnitude, beta)
    return int(math.copysign(magnitude, x))  # int() truncates toward zero


def bucket_ref(method: str, pi, pj, ratio: float) -> int:
    """Bucket of the offset p_i - p_j for one pair of (row, col) positions."""
    beta_int = int(2 * ratio)
    dr, dc = pi[0] - pj[0], pi[1] - pj[1]
    if method == "product":
        return (g_ref(dr, ratio) + beta_int) * (2 * beta_int + 1) + g_ref(dc, ratio) + beta_int
    if method == "cross_rows":
        return g_ref(dr, ratio) + beta_int
    if method == "cross_cols":
        return g_ref(dc, ratio) + beta_int
    if method == "euc":
        return g_ref(round(math.sqrt(dr * dr + dc * dc)), ratio) + beta_int
    if method == "quant":
        return g_ref(dr * dr + dc * dc, ratio) + beta_int
    raise ValueError(method)


def num_buckets_ref(method: str, ratio: float) -> int:
    side = 2 * int(2 * ratio) + 1
    return side * side if method == "product" else side


def bucket_matrix_ref(method: str, height: int, width: int, ratio: float, skip: int = 0) -> torch.Tensor:
    """(skip + H*W, skip + H*W) bucket ids by looping over every pair of positions."""
    positions = [(r, c) for r in range(height) for c in range(width)]
    n = skip + len(positions)
    extra = num_buckets_ref("product" if method == "product" else "euc", ratio)
    ids = torch.full((n, n), extra, dtype=torch.long)
    for a, pi in enumerate(positions):
        for b, pj in enumerate(positions):
            ids[skip + a, skip + b] = bucket_ref(method, pi, pj, ratio)
    return ids


def table_methods(method: str):
    return ["cross_rows", "cross_cols"] if method == "cross" else [method]


def tables_of(module, which: str):
    """[(table_method, RPETable)] of rpe_q / rpe_k / rpe_v of an RPEMultiheadAttention."""
    return [(table.method, table) for on, table in module.rpe_tables() if on == which]


def attention_ref(module, query, key_padding_mask, hw, dropout_mask=None):
    """Naive self-attention with iRPE for an RPEMultiheadAttention in eval mode, or with the
    given dropout multipliers of the attention weights (``(B, H, L, L)``, 0 or ``1 / (1 - p)``).

    Every per-pair encoding is materialised as an explicit (H, L, L[, D]) tensor indexed with
    reference bucket ids, then combined with einsums:
        logits_ij = q_i.k_j / sqrt(d) + (q_i/sqrt(d)).rk[b(i,j)] + (k_j/sqrt(d)).rq[b(j,i)]
        out_i     = sum_j a_ij (v_j + rv[b(i,j)])
    """
    L, B, C = query.shape
    H = module.num_heads
    D = C // H
    w, bias = module.in_proj_weight, module.in_proj_bias
    q = (query @ w[:C].T + bias[:C]).reshape(L, B, H, D).permute(1, 2, 0, 3)
    k = (query @ w[C:2 * C].T + bias[C:2 * C]).reshape(L, B, H, D).permute(1, 2, 0, 3)
    v = (query @ w[2 * C:].T + bias[2 * C:]).reshape(L, B, H, D).permute(1, 2, 0, 3)
    out, attn = attention_heads_ref(module, q, k, v, key_padding_mask, hw, dropout_mask, weights=True)
    out = out.permute(2, 0, 1, 3).reshape(L, B, C)
    return module.out_proj(out), attn.mean(1)


def attention_heads_ref(module, q, k, v, key_padding_mask, hw, dropout_mask=None, weights=False):
    """:func:`attention_ref` between the projections: ``(B, H, L, D)`` q, k, v (not scaled) with the
    iRPE tables of ``module`` (an RPEMultiheadAttention) to the ``(B, H, L, D)`` output of the heads,
    so that a test can compare the gradients of q, k and v themselves (with ``weights``, also the
    ``(B, H, L, L)`` attention weights)."""
    B, H, L, D = q.shape
    scale = 1.0 / math.sqrt(D)
    logits = torch.einsum("bhid,bhjd->bhij", q * scale, k)
    cfg = module.rpe_config
    skip = cfg.skip if cfg is not None else 0

    def ids_for(method):
        return bucket_matrix_ref(method, hw[0], hw[1], cfg.ratio, skip)

    for method, table in tables_of(module, "k"):
        ids = ids_for(method)
        if table.mode == "bias":
            logits = logits + table.lookup_table_bias[:, ids].expand(H, L, L)
        else:
            r = table.lookup_table_weight.transpose(1, 2)[:, ids]  # (heads, L, L, D)
            logits = logits + torch.einsum("bhid,hijd->bhij", q * scale, r.expand(H, L, L, D))
    for method, table in tables_of(module, "q"):
        ids = ids_for(method).T  # query side: bucket of p_j - p_i
        if table.mode == "bias":
            logits = logits + table.lookup_table_bias[:, ids].expand(H, L, L)
        else:
            r = table.lookup_table_weight.transpose(1, 2)[:, ids]  # r[h, i, j] = rq[b(j, i)]
            logits = logits + torch.einsum("bhjd,hijd->bhij", k * scale, r.expand(H, L, L, D))
    if key_padding_mask is not None:
        logits = logits.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
    attn = logits.softmax(-1)
    if dropout_mask is not None:  # (B, H, L, L) multipliers: 0 or 1 / (1 - p)
        attn = attn * dropout_mask
    out = torch.einsum("bhij,bhjd->bhid", attn, v)
    for method, table in tables_of(module, "v"):
        r = table.lookup_table_weight[:, ids_for(method)]  # (heads, L, L, D)
        out = out + torch.einsum("bhij,hijd->bhid", attn, r.expand(H, L, L, D))
    return (out, attn) if weights else out
