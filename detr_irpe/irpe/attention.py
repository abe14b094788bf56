"""Multi-head attention with iRPE: a drop-in for ``nn.MultiheadAttention`` as DETR's encoder uses it."""
from __future__ import annotations

import math
from typing import Callable, Iterator, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import chunked, native, triton_kernel
from .buckets import BucketCache, bucket_ids_2d
from .spec import RPEConfig, as_rpe_config
from .tables import RPETable, build_table

RPE_IMPLS = ("auto", "native", "chunked", "sdpa", "triton")
KERNELS = {"native": native, "chunked": chunked, "triton": triton_kernel}  # the blockwise kernels by name


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

    How it is computed (``rpe_impl``). Without iRPE: ``F.scaled_dot_product_attention``, except
    self-attention with dropout on CPU, where SDPA has no flash kernel and forms the full weights:
    there the ``"native"`` kernel below (unless ``rpe_impl`` is ``"sdpa"`` or ``"chunked"``).

    * ``"native"``: a compiled CPU kernel (:mod:`.native`, built on first use) that takes blocks
      of query rows through logits, softmax and values in one pass each, reading every pair's
      iRPE term from per-bucket tables, and recomputes each block in backward from the saved
      log-sum-exp (as flash attention does). No ``(B, H, L, L)`` tensor is formed. Its dropout
      masks are drawn from a hash of a seed taken from torch's generator (so ``torch.manual_seed``
      fixes them), not from the generator itself.
    * ``"chunked"``: the same blockwise algorithm in PyTorch ops; the fallback where the kernel
      cannot be built.
    * ``"sdpa"``: the iRPE terms go to SDPA as a ``(B, H, L, L)`` float mask (the weights are
      formed explicitly for an encoding on values).
    * ``"triton"``: the fused GPU kernel (:mod:`.triton_kernel`): flash-attention forward and
      backward reading the iRPE terms from the tables inside the kernel, fp32 / bf16 / fp16, head
      dims 32 and 64, dropout in the kernel. On CUDA (compute capability 8.0+), or on CPU tensors
      through Triton's interpreter when ``TRITON_INTERPRET=1`` was set before import (tests).
      Opt-in: proven against the float64 reference through the interpreter and compiled for
      sm_80 / sm_90, not yet measured on a GPU.
    * ``"auto"`` (default): ``"native"`` on CPU if it could be built and its int16 bucket ids hold
      the tables (at most 2^15 buckets: the product method up to ratio 45.4), else ``"chunked"``;
      ``"sdpa"`` on other devices (until ``"triton"`` has been measured there).

    ``need_weights=True`` or an ``attn_mask`` always takes the explicit / SDPA path, and so does
    an export (``torch.export``, ``torch.onnx.export(..., dynamo=True)``), as explicit weights,
    with the bucket ids computed inside the graph from the feature-map size. The choice is
    :func:`choose_impl`'s. All paths agree to rounding (tested against a naive float64 reference).

    Args:
        embed_dim: model width ``C``.
        num_heads: number of heads ``H``; must divide ``embed_dim``.
        dropout: dropout on the attention weights.
        rpe: ``None``, an iRPE spec string or an :class:`RPEConfig`.
        bucket_cache: a :class:`BucketCache` to share between layers (one is made if not given).
        rpe_impl: ``"auto"``, ``"native"``, ``"chunked"`` or ``"sdpa"`` (see above).

    Attribute ``chunk_rows`` (default None: chosen from ``L``) sets the query rows per block of
    the native and chunked paths.

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

    def _bucket_lookup(self, hw: Optional[Tuple[int, int]], length: int, device, in_graph: bool = False):
        """Returns ``get_ids(method) -> (L, L)`` bucket ids for the current feature map, and its ``(H, W)``.

        ``in_graph=True`` (an export): the ids are computed by :func:`bucket_ids_2d` in this call
        (once per table method), from ``hw`` as given (symbolic sizes under ``torch.export``), so
        they become part of the traced graph and follow its input size; the cache, keyed by
        Python ints, is not used.
        """
        cfg = self.rpe_config
        if hw is None:
            side = math.isqrt(length - cfg.skip)
            if side * side != length - cfg.skip:
                raise ValueError(f"iRPE needs the feature-map size: pass hw=(H, W) "
                                 f"(sequence length {length} is not a square grid)")
            hw = (side, side)
        height, width = (hw[0], hw[1]) if in_graph else (int(hw[0]), int(hw[1]))
        if height * width + cfg.skip != length:
            raise ValueError(f"iRPE: hw={tuple(hw)} gives {height * width} image tokens + {cfg.skip} skip "
                             f"tokens, but the sequence has {length}; pass the feature map's (H, W) and set "
                             f"RPEConfig.skip to the number of extra tokens")

        traced = {}  # this call's in-graph ids by method: q, k and v tables share one computation

        def get_ids(method: str, factors: bool = False, **layout):
            if in_graph:
                if method not in traced:
                    traced[method] = bucket_ids_2d(method, height, width, cfg.ratio, cfg.skip, device)[0]
                return traced[method]
            lookup = self.bucket_cache.factors if factors else self.bucket_cache.get
            return lookup(method, height, width, cfg.ratio, cfg.skip, device, **layout)

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

        get_ids, grid = None, None
        bias = None  # additive logits, broadcastable to (B, H, L, S)
        p = self.dropout if self.training else 0.0
        if self.rpe_config is not None and S != L:
            raise ValueError(f"iRPE is defined for self-attention; got {L} queries and {S} keys")
        impl = choose_impl(self.rpe_impl, self.rpe_config, q.device.type, q.dtype, p, self_attention=S == L,
                           need_weights=need_weights, attn_mask=attn_mask is not None,
                           kernel_available=lambda: native.load() is not None, tracing=tracing_mode(),
                           triton_refusal=lambda: triton_refusal(self.rpe_config, q.device.type, q.dtype,
                                                                 self.head_dim, p))
        if self.rpe_config is not None:
            get_ids, grid = self._bucket_lookup(hw, L, query.device, in_graph=impl == "export")
        if impl in KERNELS:
            out = self._blockwise(KERNELS[impl], q, k, v, key_padding_mask, get_ids, grid, p)
            return self.out_proj(out.permute(2, 0, 1, 3).reshape(L, B, C)), None
        if self.rpe_k is not None:
            bias = self.rpe_k.logits(q * scale, get_ids)
        if self.rpe_q is not None:
            term = self.rpe_q.logits(k * scale, get_ids).transpose(-2, -1)
            bias = term if bias is None else bias + term
        bias = _merge_masks(bias, attn_mask, key_padding_mask, B, self.num_heads, L, S, q.dtype)

        if self.rpe_v is None and not need_weights and impl == "sdpa":
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

    def rpe_tables(self) -> Iterator[Tuple[str, RPETable]]:
        """``(which, table)`` for every lookup table, ``which`` in ``q``, ``k``, ``v`` (two per
        ``cross`` encoding: its row and column tables)."""
        for which in "qkv":
            module = getattr(self, f"rpe_{which}")
            if module is not None:
                for table in module.parts():
                    yield which, table

    def _blockwise(self, kernel, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor],
                   get_ids, grid: Optional[Tuple[int, int]], dropout: float) -> Tensor:
        """A blockwise kernel (:mod:`.native`, :mod:`.chunked`, :mod:`.triton_kernel`); q, k, v and the
        result are ``(B, H, L, D)``."""
        B, H, L, _ = q.shape
        pad = None
        if key_padding_mask is not None:
            if key_padding_mask.shape != (B, L):
                raise ValueError(f"key_padding_mask must be (B, S) = {(B, L)}, got {tuple(key_padding_mask.shape)}")
            if key_padding_mask.any():
                pad = key_padding_mask.view(B, 1, 1, L)
        seed = int(torch.randint(0, 2 ** 62, ())) if dropout > 0 else 0
        tables = list(self.rpe_tables())
        skip = self.rpe_config.skip if self.rpe_config is not None else 0
        plan = kernel.make_plan(tables, get_ids, grid, skip, q.shape, self.head_dim ** -0.5, pad, dropout, seed,
                                self.chunk_rows)
        return kernel.run(plan, q, k, v, [table.lookup_table for _, table in tables])

    def extra_repr(self) -> str:
        rpe = self.rpe_config.spec if self.rpe_config is not None else None
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, dropout={self.dropout}, rpe={rpe}"


def tracing_mode() -> str:
    """How this forward is being captured: ``"export"`` under ``torch.export`` (which
    ``torch.onnx.export(..., dynamo=True)`` uses), ``"torchscript"`` under ``torch.jit.trace`` (which
    the TorchScript ONNX exporter, ``dynamo=False``, uses), else ``""``."""
    if torch.compiler.is_exporting():
        return "export"
    return "torchscript" if torch.jit.is_tracing() else ""


def triton_refusal(config: Optional[RPEConfig], device_type: str, dtype: torch.dtype, head_dim: int,
                   dropout: float) -> Optional[str]:
    """Why the Triton kernel cannot serve a call (no triton, no GPU nor interpreter, a dtype, head dim
    or table size it lacks), or None if it can."""
    if dtype not in triton_kernel.DTYPES:
        return f"it computes in float32, bfloat16 or float16, not {dtype}"
    return triton_kernel.available(device_type) or (
        triton_kernel.represents(config, head_dim, dropout) if config is not None else None)


def choose_impl(rpe_impl: str, config: Optional[RPEConfig], device_type: str, dtype: torch.dtype, dropout: float,
                self_attention: bool, need_weights: bool, attn_mask: bool,
                kernel_available: Callable[[], bool], tracing: str = "",
                triton_refusal: Callable[[], Optional[str]] = lambda: "not asked") -> str:
    """Which computation serves one attention call: ``"native"``, ``"chunked"``, ``"triton"``,
    ``"sdpa"`` or ``"export"``.

    ``"sdpa"`` is SDPA, or the explicit weights where they are needed (``need_weights``, iRPE on
    values). ``"export"`` is the explicit computation (logits, softmax, weights times values; SDPA's
    decomposition breaks on symbolic strides) with the bucket ids computed inside the traced graph
    from the feature-map size instead of read from the cache. ``kernel_available()`` says
    whether the compiled CPU kernel could be built, ``triton_refusal()`` why the Triton kernel
    cannot serve the call (None: it can); each is called only where the answer matters (the CPU
    kernel is built then). ``tracing`` is :func:`tracing_mode`'s answer. Rows are tried in order:

    ========================  ====  ==================================================  ============
    rpe_impl                  iRPE  condition                                           result
    ========================  ====  ==================================================  ============
    any                       any   tracing == "export"                                 export
    any                       yes   tracing == "torchscript"                            RuntimeError
    any                       any   need_weights or attn_mask                           sdpa
    sdpa                      any                                                       sdpa
    triton                    no                                                        sdpa
    triton                    yes   the Triton kernel can serve the call                triton
    triton                    yes   otherwise (the reason)                              RuntimeError
    any                       any   dtype not fp32 / fp64                               sdpa
    auto / native             no    CPU self-attention, dropout > 0, kernel available   native
    any                       no    otherwise                                           sdpa
    chunked                   yes                                                       chunked
    auto                      yes   not on the CPU                                      sdpa
    native                    yes   not on the CPU                                      ValueError
    auto / native             yes   kernel available, tables of <= 2^15 buckets         native
    native                    yes   tables of more than 2^15 buckets                    ValueError
    native                    yes   kernel unavailable                                  RuntimeError
    auto                      yes   otherwise (no kernel, or too many buckets)          chunked
    ========================  ====  ==================================================  ============

    Without iRPE the CPU kernel serves only CPU training with dropout, where SDPA has no flash
    kernel and forms the full weights; SDPA's own fused kernels serve plain attention on a GPU.
    The CPU kernel's bucket ids are int16, so larger tables (the product method from ratio 45.5
    on) take the row-chunked kernel. ``auto`` keeps SDPA on GPUs until the Triton kernel has been
    measured there. No blockwise kernel can be traced, so an export takes the ``"export"`` path
    whatever ``rpe_impl`` asks for (all paths compute the same attention). ``torch.jit.trace``
    would record the bucket ids of the trace size as constants, so an iRPE layer refuses it.
    """
    if tracing == "export":
        return "export"
    if tracing == "torchscript" and config is not None:
        raise RuntimeError(f"iRPE ({config.spec}) cannot be traced by torch.jit.trace (nor by "
                           f"torch.onnx.export(..., dynamo=False), which uses it): the bucket ids would be "
                           f"frozen at the trace size. Use torch.export / torch.onnx.export(..., dynamo=True), "
                           f"or detr_irpe.export")
    if need_weights or attn_mask or rpe_impl == "sdpa":
        return "sdpa"
    if rpe_impl == "triton":
        if config is None:
            return "sdpa"
        reason = triton_refusal()
        if reason is not None:
            raise RuntimeError(f"rpe_impl='triton' cannot serve this call: {reason}. Use rpe_impl='auto' (or "
                               f"model.rpe_impl=auto) for the other paths")
        return "triton"
    if dtype not in (torch.float32, torch.float64):
        return "sdpa"
    if config is None:
        plain = dropout > 0 and self_attention and device_type == "cpu" and rpe_impl != "chunked"
        return "native" if plain and kernel_available() else "sdpa"
    if rpe_impl == "chunked":
        return "chunked"
    if device_type != "cpu":
        if rpe_impl == "native":
            raise ValueError(f"rpe_impl='native' is a CPU kernel; the inputs are on {device_type}")
        return "sdpa"
    fits = native.represents(config)
    if fits and kernel_available():
        return "native"
    if rpe_impl == "native":
        if not fits:
            raise ValueError(f"rpe_impl='native': {config.spec} has {config.num_buckets} buckets per table, more "
                             f"than the compiled kernel's {native.MAX_BUCKETS} (int16 bucket ids); use "
                             f"rpe_impl='auto' or 'chunked'")
        raise RuntimeError(f"rpe_impl='native': the fused iRPE CPU kernel is unavailable "
                           f"({native.unavailable_reason()}); use rpe_impl='auto' to fall back")
    return "chunked"


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
