"""Training curves from ``log.jsonl`` records: losses, class error and AP over epochs, several runs.

A record is one epoch: ``{"epoch": 0, "train_loss": ..., "train_loss_ce": ..., "val_AP": ...}``
(``val_*`` only on evaluated epochs). Training-set values are drawn as solid lines, validation
values (``val_*``, e.g. a validation loss if present) dashed; each run has its own colour.

A ``train_*`` value is the average over the epoch's iterations. An epoch cut short (logged with
``out_of_time``, or with fewer ``train_iterations`` than the run's full epochs, e.g. after a change
of ``train.max_iters_per_epoch``) averages a few batches, often one, taken at its start: joined to
the line, that noisy number draws as a spike at the end of the curve. Such an epoch is drawn as a
hollow marker of its own, not joined, with its iterations beside it ("1/400 it.") and a legend key.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from ..errors import UsageError
from ..files import atomic_write

# (panel title, y label, metric names without the train_ / val_ prefix)
PANELS: Tuple[Tuple[str, str, Tuple[str, ...]], ...] = (
    ("total loss", "loss", ("loss",)),
    ("classification loss (loss_ce)", "loss", ("loss_ce",)),
    ("L1 box loss (loss_bbox)", "loss", ("loss_bbox",)),
    ("GIoU loss (loss_giou)", "loss", ("loss_giou",)),
    ("class error", "%", ("class_error",)),
    ("AP / AP50", "AP", ("AP", "AP50")),
)
PREFIXES = ("train_", "val_")


def series(records: Sequence[Mapping], key: str) -> Tuple[List[float], List[float]]:
    """Epochs and values of ``key``: finite numbers only, the last record of a repeated epoch
    (a resumed run logs an epoch again) wins, sorted by epoch. Records without ``epoch`` count
    by position."""
    by_epoch: Dict[float, float] = {}
    for i, record in enumerate(records):
        value = record.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            continue
        epoch = record.get("epoch", i)
        if isinstance(epoch, (int, float)):
            by_epoch[float(epoch)] = float(value)
    epochs = sorted(by_epoch)
    return epochs, [by_epoch[e] for e in epochs]


def cut_short(records: Sequence[Mapping]) -> Dict[float, Tuple[Optional[int], Optional[int]]]:
    """The epochs trained for fewer iterations than the run's full ones: ``epoch -> (iterations,
    iterations of a full epoch)`` (None where the log does not say). An epoch is cut short when its
    record has ``out_of_time`` or fewer ``train_iterations`` than the run's most; the last record of
    a repeated epoch wins, as in :func:`series`."""
    trained: Dict[float, Tuple[Optional[int], bool]] = {}
    for i, record in enumerate(records):
        epoch = record.get("epoch", i)
        if not isinstance(epoch, (int, float)) or not ("train_iterations" in record or "out_of_time" in record):
            continue
        n = record.get("train_iterations")
        n = n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else None
        trained[float(epoch)] = (n, record.get("out_of_time") is True)
    full = max((n for n, _ in trained.values() if n is not None), default=None)
    return {epoch: (n, full) for epoch, (n, out_of_time) in trained.items()
            if out_of_time or (n is not None and n < full)}


def run_names(paths: Sequence) -> List[str]:
    """A short, distinct legend name per log file: its folder name, with more of the path if needed."""
    paths = [Path(p).resolve() for p in paths]
    for depth in range(1, max((len(p.parts) for p in paths), default=1)):
        names = ["/".join(p.parent.parts[-depth:]) or p.stem for p in paths]
        if len(set(names)) == len(names):
            return names
    names = [f"{p.parent.name}/{p.name}" for p in paths]  # logs in the same folder
    return names if len(set(names)) == len(names) else [str(p) for p in paths]


def plot_training_curves(runs: Mapping[str, Sequence[Mapping]], out, title: Optional[str] = None,
                         dpi: int = 100) -> Path:
    """Plot the :data:`PANELS` of each run (``name -> log records``) into a PNG at ``out``.

    Panels no run has data for are left out. Raises ``ValueError`` when there is nothing at all.
    """
    fig = training_curves_figure(runs, title)
    return atomic_write(out, lambda f: fig.savefig(f, dpi=dpi, format="png"))


def training_curves_figure(runs: Mapping[str, Sequence[Mapping]], title: Optional[str] = None):
    """The matplotlib ``Figure`` that :func:`plot_training_curves` saves."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    if not runs:
        raise ValueError("no runs to plot")
    panels = []
    for panel_title, ylabel, metrics in PANELS:
        lines = []
        for name, records in runs.items():
            for m_i, metric in enumerate(metrics):
                for prefix in PREFIXES:
                    epochs, values = series(records, prefix + metric)
                    if epochs:
                        lines.append((name, prefix, metric, m_i, epochs, values))
        if lines:
            panels.append((panel_title, ylabel, metrics, lines))
    if not panels:
        raise UsageError(f"no losses, class error or AP found in the logs of {', '.join(runs)}: expected "
                         f"log.jsonl records with keys like train_loss, train_class_error, val_AP")

    short = {name: cut_short(records) for name, records in runs.items()}
    colors = {name: f"C{i % 10}" for i, name in enumerate(runs)}
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig = Figure(figsize=(5.0 * ncols, 3.6 * nrows + 0.8), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for ax, (panel_title, ylabel, metrics, lines) in zip(axes.flat, panels):
        keys = []  # (linestyle, text) of the lines in this panel, for its own small legend
        hollow = False  # whether the panel shows a cut-short epoch
        for name, prefix, metric, m_i, epochs, values in lines:
            style = ":" if m_i > 0 else ("--" if prefix == "val_" and len(metrics) == 1 else "-")
            text = metric if len(metrics) > 1 else prefix.rstrip("_")
            if (style, text) not in keys:
                keys.append((style, text))
            cut = short[name] if prefix == "train_" else {}  # an evaluation is whole however long the epoch
            joined = [(e, v) for e, v in zip(epochs, values) if e not in cut]
            if joined:
                ax.plot(*zip(*joined), linestyle=style, color=colors[name],
                        marker="o" if len(joined) <= 30 else None, markersize=3)
            for e, v in zip(epochs, values):
                if e in cut:
                    hollow = True
                    ax.plot([e], [v], linestyle="none", marker="o", markersize=6, markerfacecolor="white",
                            markeredgecolor=colors[name])
                    n, full = cut[e]
                    if n is not None:
                        ax.annotate(f"{n}/{full} it." if full else f"{n} it.", (e, v), xytext=(4, 4),
                                    textcoords="offset points", fontsize=7, color=colors[name])
        ax.set_title(panel_title, fontsize=10)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        handles = [Line2D([], [], color="0.3", linestyle=st, label=t) for st, t in keys]
        if hollow:
            handles.append(Line2D([], [], color="0.3", linestyle="none", marker="o", markerfacecolor="white",
                                  label="epoch cut short (fewer iterations)"))
        if len(handles) > 1:
            ax.legend(handles=handles, fontsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_axis_off()
    handles = [Line2D([], [], color=colors[name], linewidth=2.5, label=name) for name in runs]
    fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 4), fontsize=9,
               title="run")
    if title:
        fig.suptitle(title)
    return fig
