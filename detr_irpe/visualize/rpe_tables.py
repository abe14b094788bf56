"""The learned iRPE lookup tables of the encoder, drawn with matplotlib.

For the ``product`` method a table row holds ``(2*beta_int+1)**2`` buckets; bucket
``(g(dr) + beta_int) * (2*beta_int+1) + g(dc) + beta_int`` is drawn at row ``g(dr)``, column
``g(dc)`` of a square grid, so the centre is offset 0. ``dr, dc`` are the offsets of the
*query minus the key* for tables on keys and values, *key minus query* for tables on queries
(see :class:`detr_irpe.irpe.RPEMultiheadAttention`). What is drawn per bucket:

* bias mode: the learned bias (per head, or one shared by all heads);
* contextual mode: the L2 norm of the bucket's vector;
* contextual mode with a query token: its contribution to the attention logit, ``(q*scale)·r``
  for the table on keys and ``(k*scale)·r`` for the one on queries, per head.

The other methods (``euc``, ``quant``, ``cross``) hold a 1D table, drawn as a line over the
bucket index minus ``beta_int`` (the offset / distance bucket). ``euc`` and ``quant`` buckets
are ``g(distance) + beta_int`` with distance >= 0, so only their upper half (distance bucket
0..beta_int) is ever used and drawn.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import UsageError
from ..files import atomic_write

from ..irpe import RPEMultiheadAttention, num_buckets


class NoRPEError(UsageError):
    """The model has no iRPE lookup tables, so there is nothing to plot."""


@dataclass
class TableView:
    """What one subplot row shows: one lookup table of one encoder layer.

    Attributes:
        layer: encoder layer index.
        which: ``q``, ``k`` or ``v`` (the table's place in the attention).
        method: bucket method of the table (``product``, ``euc``, ``quant``, ``cross_rows``, ``cross_cols``).
        values: ``(heads, num_buckets)`` what is drawn per bucket (skip-token bucket left out).
        quantity: what ``values`` are (``bias``, ``||r||``, ``q·r``, ``k·r``).
        beta_int: ``int(beta)``; bucket index ``beta_int`` is offset 0.
        spec: the layer's iRPE spec string.
    """

    layer: int
    which: str
    method: str
    values: np.ndarray
    quantity: str
    beta_int: int
    spec: str

    @property
    def signed(self) -> bool:
        """Values of either sign (drawn with a diverging colour map centred on 0)."""
        return self.quantity != "||r||"

    @property
    def name(self) -> str:
        part = {"cross_rows": " rows", "cross_cols": " cols"}.get(self.method, "")
        return f"layer {self.layer} rpe_{self.which}{part}"


def rpe_attention_modules(model: nn.Module) -> List[Tuple[int, RPEMultiheadAttention]]:
    """``(encoder layer index, attention)`` of every :class:`RPEMultiheadAttention` that has iRPE tables."""
    modules = [m for m in model.modules() if isinstance(m, RPEMultiheadAttention)]
    found = [(i, m) for i, m in enumerate(modules) if m.rpe_config is not None]
    if not found:
        raise NoRPEError("this model has no iRPE (its encoder was built with model.rpe = None, a plain DETR), "
                         "so there are no lookup tables to plot. Use a checkpoint trained with an iRPE spec "
                         "such as rpe-2.0-product-ctx-1-k.")
    return found


def table_views(model: nn.Module, layers: Optional[Sequence[int]] = None,
                tokens: Optional[Dict[int, Dict[str, Tensor]]] = None) -> List[TableView]:
    """The tables of the chosen encoder ``layers`` (all with iRPE by default), ready to draw.

    Args:
        tokens: per layer, ``{"q": (heads, head_dim), "k": (heads, head_dim)}`` scaled query and
            key vectors of one token (see :func:`capture_token`); contextual tables on keys /
            queries then show that token's contribution ``q·r`` / ``k·r`` instead of ``||r||``.
    """
    modules = rpe_attention_modules(model)
    available = [i for i, _ in modules]
    if layers is not None:
        total = sum(isinstance(m, RPEMultiheadAttention) for m in model.modules())
        layers = [l + total if l < 0 else l for l in layers]  # negative: from the end
        unknown = [l for l in layers if l not in available]
        if unknown:
            raise UsageError(f"encoder layer(s) {unknown} have no iRPE tables; layers with iRPE: {available}")
        modules = [(i, m) for i, m in modules if i in layers]
    views = []
    for layer, module in modules:
        cfg = module.rpe_config
        n = num_buckets(cfg.method, cfg.beta)  # without the skip-token bucket
        for which, table in module.rpe_tables():
            with torch.no_grad():
                if table.mode == "bias":
                    values, quantity = table.lookup_table_bias.float(), "bias"
                elif which in "qk" and tokens is not None and layer in tokens:
                    other = "q" if which == "k" else "k"  # keys' table meets the query, and vice versa
                    vec = tokens[layer][other].float()  # (H, D)
                    weight = table.lookup_table_weight.float()  # (1 or H, D, nb)
                    values = torch.einsum("hd,hdn->hn", vec, weight.expand(vec.shape[0], -1, -1))
                    quantity = f"{other}·r"
                else:
                    dim = 2 if table.on_values else 1
                    values, quantity = table.lookup_table_weight.float().norm(dim=dim), "||r||"
            views.append(TableView(layer, which, table.method, values[:, :n].detach().cpu().numpy(), quantity,
                                   int(cfg.beta), cfg.spec))
    return views


@torch.no_grad()
def capture_token(model: nn.Module, batch: Tensor, mask: Tensor, token: int) -> Dict[int, Dict[str, Tensor]]:
    """Scaled query and key vectors of encoder token ``token`` (of image 0) in every iRPE layer.

    Runs ``model(batch, mask)`` with forward pre-hooks on the iRPE attention modules. Returns
    ``{layer: {"q": (heads, head_dim), "k": (heads, head_dim)}}``, both multiplied by
    ``head_dim ** -0.5`` as in the attention logits.
    """
    found: Dict[int, Dict[str, Tensor]] = {}
    handles = []

    def make_hook(layer: int):
        def hook(module, args, kwargs):
            query = args[0] if len(args) > 0 else kwargs["query"]
            key = args[1] if len(args) > 1 else kwargs["key"]
            C, H, D = module.embed_dim, module.num_heads, module.head_dim
            if not 0 <= token < query.shape[0]:
                raise ValueError(f"token {token} is outside the encoder sequence of length {query.shape[0]}")
            w, b = module.in_proj_weight, module.in_proj_bias  # nn.MultiheadAttention layout: q, k, v rows
            q = F.linear(query[token, 0], w[:C], b[:C]).reshape(H, D)
            k = F.linear(key[token, 0], w[C: 2 * C], b[C: 2 * C]).reshape(H, D)
            found[layer] = {"q": q.float().cpu() * D ** -0.5, "k": k.float().cpu() * D ** -0.5}

        return hook

    try:
        for layer, module in rpe_attention_modules(model):
            handles.append(module.register_forward_pre_hook(make_hook(layer), with_kwargs=True))
        model.eval()
        model(batch, mask)
    finally:
        for h in handles:
            h.remove()
    return found


def _offset_ticks(ax, axis: str, beta_int: int) -> None:
    side = 2 * beta_int + 1
    step = 1 if side <= 13 else 2
    ticks = list(range(0, side, step))
    labels = [str(t - beta_int) for t in ticks]
    if axis == "x":
        ax.set_xticks(ticks, labels)
    else:
        ax.set_yticks(ticks, labels)


def _axis_label(view: TableView) -> Tuple[str, str]:
    """x and y axis labels of a view."""
    rel = "key-query" if view.which == "q" else "query-key"
    if view.method == "product":
        return f"column offset bucket ({rel})", f"row offset bucket ({rel})"
    if view.method == "cross_rows":
        return f"row offset bucket ({rel})", view.quantity
    if view.method == "cross_cols":
        return f"column offset bucket ({rel})", view.quantity
    what = "squared distance" if view.method == "quant" else "distance"
    return f"{what} bucket (0 = same position)", view.quantity


def plot_table_views(views: Sequence[TableView], out, title: Optional[str] = None, dpi: int = 100,
                     cmap_signed: str = "RdBu_r", cmap_norm: str = "viridis") -> Path:
    """Draw ``views`` into a PNG at ``out``: one row per table, one column per head.

    Product tables are square images of the (row offset, column offset) bucket grid with a
    colour bar (one colour scale per table, shared by its heads; signed values centred on 0);
    other methods are lines over the bucket index. When every table is shared by all heads the
    tables are laid out in a grid of up to 4 columns instead.
    """
    from matplotlib.figure import Figure

    if not views:
        raise ValueError("no tables to plot")
    cells = [(v, h) for v in views for h in range(v.values.shape[0])]
    max_heads = max(v.values.shape[0] for v in views)
    if max_heads == 1:
        ncols = min(4, len(views))
        nrows = math.ceil(len(views) / ncols)
        positions = [(i // ncols, i % ncols) for i in range(len(cells))]
    else:
        ncols, nrows = max_heads, len(views)
        positions = [(r, h) for r, v in enumerate(views) for h in range(v.values.shape[0])]
    fig = Figure(figsize=(3.4 * ncols, 3.0 * nrows + (0.5 if title else 0)), layout="constrained")
    axes = np.atleast_2d(fig.subplots(nrows, ncols, squeeze=False))
    used = set()
    for (view, head), (r, c) in zip(cells, positions):
        ax = axes[r, c]
        used.add((r, c))
        values = view.values[head]
        heads = view.values.shape[0]
        head_text = "shared" if heads == 1 else f"head {head}"
        ax.set_title(f"{view.name}, {head_text}\n{view.quantity}", fontsize=9)
        xlabel, ylabel = _axis_label(view)
        if view.method == "product":
            side = 2 * view.beta_int + 1
            if view.signed:
                vmax = float(np.abs(view.values).max()) or 1.0
                norm = dict(cmap=cmap_signed, vmin=-vmax, vmax=vmax)
            else:
                norm = dict(cmap=cmap_norm, vmin=0.0, vmax=float(view.values.max()) or 1.0)
            im = ax.imshow(values.reshape(side, side), origin="upper", interpolation="nearest", **norm)
            _offset_ticks(ax, "x", view.beta_int)
            _offset_ticks(ax, "y", view.beta_int)
            ax.tick_params(labelsize=7)
            fig.colorbar(im, ax=ax, shrink=0.85)
        else:
            x = np.arange(values.shape[0]) - view.beta_int
            if view.method in ("euc", "quant"):  # distances are >= 0: the lower half is never used
                x, values = x[view.beta_int:], values[view.beta_int:]
            ax.plot(x, values, marker="o", markersize=3)
            if view.signed:
                ax.axhline(0.0, color="0.6", linewidth=0.8)
            ax.set_xticks(x)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.set_ylabel(ylabel, fontsize=8)
    for r in range(nrows):
        for c in range(ncols):
            if (r, c) not in used:
                axes[r, c].set_axis_off()
    if title:
        fig.suptitle(title, fontsize=11)
    return atomic_write(out, lambda f: fig.savefig(f, dpi=dpi, format="png"))


def plot_rpe_tables(model: nn.Module, out, layers: Optional[Sequence[int]] = None,
                    tokens: Optional[Dict[int, Dict[str, Tensor]]] = None, title: Optional[str] = None,
                    dpi: int = 100) -> Path:
    """Plot the iRPE lookup tables of ``model``'s encoder (see the module docstring) to a PNG.

    Raises:
        NoRPEError: the model has no iRPE.
    """
    views = table_views(model, layers, tokens)
    if title is None:
        specs = sorted({v.spec for v in views})
        title = f"iRPE lookup tables ({', '.join(specs)})"
    return plot_table_views(views, out, title=title, dpi=dpi)
