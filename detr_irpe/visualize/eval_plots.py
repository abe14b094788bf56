"""Pictures that explain a COCO AP, drawn from what the evaluation saved (pure drawing).

Input: one entry of ``analysis.json`` (:func:`detr_irpe.evaluation.analysis.analyze`: per-class
AP, precision-recall curves at IoU 0.5 and 0.75, the per-size breakdown, the confusion matrix),
or, for the per-class bars and the sizes only, ``metrics.json``. Sized to stay readable with
COCO's 80 classes.
"""
from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Tuple

import numpy as np

from ..errors import InputNotFoundError, UsageError
from ..files import atomic_write, check_writable, refuse_existing

PICTURES = ("per_class_ap", "pr_curves", "confusion_matrix", "sizes")  # file stems, in drawing order
AREAS = ("all", "small", "medium", "large")
AREA_RANGES = {"all": "", "small": "< 32²", "medium": "32²–96²", "large": "> 96²"}  # COCO's, in pixels
SIZE_METRICS = ("AP", "AP50", "AP75", "AR")
ANALYSIS_JSON, METRICS_JSON = "analysis.json", "metrics.json"  # what an evaluation folder holds


def _figure(width: float, height: float, left: float = 0.8, bottom: float = 0.6, right: float = 0.2,
            top: float = 0.45):
    """A figure of ``width`` x ``height`` inches with fixed margins in inches (a layout engine
    would measure every tick label of an 80-class picture again: 2-3x the drawing time)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    fig.subplots_adjust(left=left / width, right=1 - right / width, bottom=bottom / height, top=1 - top / height,
                        wspace=0.25)
    return fig


def _label_inches(labels, fontsize: float) -> float:
    """About how long the longest label is, in inches."""
    return 0.6 * fontsize / 72 * max((len(str(t)) for t in labels), default=1) + 0.15


def per_class_ap_figure(per_class: Mapping[str, float], title: str = "per-class AP"):
    """Horizontal bars, best class on top, its AP written beside each bar."""
    items = sorted(per_class.items(), key=lambda kv: (-kv[1], kv[0]))
    font = 7 if len(items) > 30 else 9
    height = max(2.5, 1.1 + 0.2 * len(items))
    fig = _figure(8.0 + _label_inches([n for n, _ in items], font), height,
                  left=0.35 + _label_inches([n for n, _ in items], font), bottom=0.55, top=0.4)
    ax = fig.add_subplot()
    if not items:
        ax.text(0.5, 0.5, "no category has ground truth", ha="center", va="center", transform=ax.transAxes)
    names, values = [n for n, _ in items], [v for _, v in items]
    y = np.arange(len(items))
    ax.barh(y, values, color="tab:blue")
    ax.set_yticks(y, names, fontsize=font)
    ax.set_ylim(len(items) - 0.4, -0.6)  # best on top, no empty rows
    for yi, v in zip(y, values):
        ax.text(v + 0.005, yi, f"{v:.3f}", va="center", fontsize=6 if len(items) > 30 else 8)
    if values:
        mean = float(np.mean(values))
        ax.axvline(mean, color="tab:red", linestyle="--", linewidth=1, label=f"mean {mean:.3f}")
        ax.legend(loc="upper right")
    ax.set_xlim(0, max(1.0, max(values, default=0) + 0.08))
    ax.set_xlabel("AP @[IoU=0.50:0.95 | area=all | maxDets=100]")
    ax.set_ylabel("category")
    ax.set_title(f"{title} ({len(items)} categories with ground truth)")
    ax.grid(axis="x", alpha=0.3)
    return fig


def _mean_curve(curves: List[List[float]]) -> np.ndarray:
    """pycocotools' mean over categories at each recall threshold (-1 entries left out)."""
    stacked = np.asarray(curves, dtype=np.float64)
    valid = stacked > -1
    return np.where(valid.any(0), np.where(valid, stacked, 0).sum(0) / np.maximum(valid.sum(0), 1), np.nan)


def pr_curves_figure(analysis: Mapping, worst: int = 5, title: str = "precision-recall"):
    """One panel per IoU (0.5, 0.75): the mean over categories (thick) and the ``worst`` categories
    by AP@[.5:.95] (thin), precision against recall."""
    recall = np.asarray(analysis["recall_thresholds"])
    per_class = analysis["per_class_AP"]
    lowest = sorted(per_class, key=lambda n: (per_class[n], n))[:worst]
    curves = analysis["pr_curves"]
    fig = _figure(6.0 * len(curves), 5.0, left=0.7, right=0.25)
    for i, (iou, by_class) in enumerate(curves.items()):
        ax = fig.add_subplot(1, len(curves), i + 1)
        present = [c for c in by_class.values() if c is not None]
        if present:
            mean = _mean_curve(present)
            ax.plot(recall, mean, color="black", linewidth=2.5,
                    label=f"all {len(present)} categories (AP{float(iou) * 100:.0f} {np.nanmean(mean):.3f})")
        for name in lowest:
            if by_class.get(name) is not None:
                p = np.asarray(by_class[name], dtype=np.float64)
                ax.plot(recall, np.where(p > -1, p, np.nan), linewidth=1.2,
                        label=f"{name} (AP{float(iou) * 100:.0f} {np.mean(p[p > -1]):.3f})")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("recall")
        ax.set_ylabel("precision (interpolated)")
        ax.set_title(f"{title} at IoU {iou} (area all, 100 detections)")
        ax.grid(alpha=0.3)
        ax.legend(loc="upper right", fontsize=8, title=f"mean and worst {len(lowest)} by AP", title_fontsize=8)
    return fig


def confusion_figure(confusion: Mapping, title: str = "confusion matrix"):
    """Rows: ground-truth category (then background: detections that matched nothing); columns:
    detected category (then background: objects that nothing detected). Colour: the share of the
    row (log scale); counts written in the cells when there are at most 20 categories."""
    from matplotlib.colors import LogNorm

    labels, matrix = list(confusion["labels"]), np.asarray(confusion["matrix"], dtype=np.int64)
    n = len(labels)
    share = matrix / np.maximum(matrix.sum(1, keepdims=True), 1)
    font = 9 if n <= 20 else 6 if n <= 50 else 4.5
    margin = 0.45 + _label_inches(labels, font)
    side = max(4.0, min(20.0, 0.14 * n))
    fig = _figure(side + margin + 1.6, side + margin + 0.9, left=margin, bottom=margin, right=1.6, top=0.9)
    ax = fig.add_subplot()
    image = ax.imshow(np.where(share > 0, share, np.nan), cmap="viridis", norm=LogNorm(vmin=1e-3, vmax=1.0),
                      interpolation="nearest")
    fig.colorbar(image, ax=ax, shrink=0.7, label="share of the row (ground-truth category)")
    ax.set_xticks(np.arange(n), labels, rotation=90, fontsize=font)
    ax.set_yticks(np.arange(n), labels, fontsize=font)
    if n <= 21:
        for (r, c), v in np.ndenumerate(matrix):
            if v:
                ax.text(c, r, str(v), ha="center", va="center", fontsize=7,
                        color="white" if share[r, c] < 0.3 else "black")
    ax.axhline(n - 1.5, color="red", linewidth=0.8)
    ax.axvline(n - 1.5, color="red", linewidth=0.8)
    ax.set_xlabel("detected category (last column: objects missed)")
    ax.set_ylabel("ground truth (last row: false detections)")
    # two lines: the axes of a few categories are narrower than the text
    ax.set_title(f"{title}\ndetections with score >= {confusion['threshold']:g}, matched at IoU "
                 f"{confusion['iou']:g} whatever their category", fontsize=10)
    return fig


def sizes_figure(sizes: Mapping[str, Mapping[str, Optional[float]]], title: str = "AP and AR by object size"):
    """Grouped bars: AP, AP50, AP75 and AR (100 detections) for all / small / medium / large objects
    (an area without ground truth is marked n/a)."""
    fig = _figure(8.0, 4.5, bottom=0.9)
    ax = fig.add_subplot()
    width = 0.8 / len(SIZE_METRICS)
    x = np.arange(len(AREAS))
    for i, metric in enumerate(SIZE_METRICS):
        values = [sizes.get(area, {}).get(metric) for area in AREAS]
        bars = ax.bar(x + (i - 1.5) * width, [v if v is not None else 0 for v in values], width, label=metric)
        for bar, v in zip(bars, values):
            ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height() + 0.01, "n/a" if v is None else f"{v:.2f}",
                    ha="center", fontsize=7)
    ax.set_xticks(x, [f"{area}\n{AREA_RANGES[area]}" for area in AREAS])
    ax.set_ylim(0, 1.1)
    ax.set_xlabel("object size (area in pixels)")
    ax.set_ylabel("AP / AR")
    ax.set_title(title)
    ax.legend(ncol=4, loc="upper left", fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return fig


def sizes_from_metrics(metrics: Mapping, prefix: str = "") -> Dict[str, Dict[str, Optional[float]]]:
    """The per-size numbers that ``metrics.json`` holds (AP, AR; -1: no ground truth of that size)."""
    def value(name):
        v = metrics.get(prefix + name)
        return None if v is None or v < 0 else float(v)

    return {"all": {"AP": value("AP"), "AP50": value("AP50"), "AP75": value("AP75"), "AR": value("AR100")},
            "small": {"AP": value("APs"), "AR": value("ARs")}, "medium": {"AP": value("APm"), "AR": value("ARm")},
            "large": {"AP": value("APl"), "AR": value("ARl")}}


def figures(analysis: Optional[Mapping] = None, metrics: Optional[Mapping] = None, prefix: str = "",
            worst: int = 5) -> Dict[str, object]:
    """``{picture name: Figure}``: all four from an ``analysis`` entry; from ``metrics`` alone
    (``prefix`` ``segm_`` for the masks) the per-class AP and the sizes."""
    label = "masks: " if prefix else ""
    if analysis is not None:
        return {"per_class_ap": per_class_ap_figure(analysis["per_class_AP"], f"{label}per-class AP"),
                "pr_curves": pr_curves_figure(analysis, worst, f"{label}precision-recall"),
                "confusion_matrix": confusion_figure(analysis["confusion"], f"{label}confusion matrix"),
                "sizes": sizes_figure(analysis["sizes"], f"{label}AP and AR by object size")}
    if metrics is None:
        raise ValueError("figures() needs an analysis or metrics")
    return {"per_class_ap": per_class_ap_figure(metrics.get(prefix + "per_class_AP", {}), f"{label}per-class AP"),
            "sizes": sizes_figure(sizes_from_metrics(metrics, prefix), f"{label}AP and AR by object size")}


def png_bytes(fig, dpi: int = 110) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=dpi, format="png")
    return buffer.getvalue()


def save_figures(figs: Mapping[str, object], out_dir, prefix: str = "", dpi: int = 110) -> Dict[str, Path]:
    """Write each figure as ``<out_dir>/<prefix><name>.png`` (atomically); ``{name: path}``."""
    out_dir = Path(out_dir)
    return {name: atomic_write(out_dir / f"{prefix}{name}.png", lambda f, fig=fig: f.write(png_bytes(fig, dpi)))
            for name, fig in figs.items()}


def write_eval_pictures(analysis: Mapping[str, Mapping], out_dir, worst: int = 5) -> Dict[str, Path]:
    """The four pictures of each IoU type of ``analysis`` (``analysis.json``: ``{bbox: ..., segm:
    ...}``) into ``out_dir``; the masks' prefixed ``segm_``. Returns ``{file stem: path}``."""
    written: Dict[str, Path] = {}
    for iou_type, entry in analysis.items():
        prefix = "segm_" if iou_type == "segm" else ""
        for name, path in save_figures(figures(entry, prefix=prefix, worst=worst), out_dir, prefix).items():
            written[prefix + name] = path
    return written


def load_eval_source(source) -> Tuple[Optional[dict], Optional[dict]]:
    """``(analysis, metrics)`` of an evaluation folder, an ``analysis.json`` or a ``metrics.json``
    (either may be None, not both)."""
    source = Path(source).expanduser()
    folder = source if source.is_dir() else source.parent
    if not source.exists():
        raise InputNotFoundError(f"not found: {source}; give an evaluation folder (eval --output-dir, a training "
                                 f"run), its analysis.json or its metrics.json")
    found = {}
    for name in (ANALYSIS_JSON, METRICS_JSON):
        path = folder / name if source.is_dir() else source if source.name == name else None
        if path is not None and path.is_file():
            try:
                found[name] = json.loads(path.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise UsageError(f"{path} is not valid JSON: {e}") from None
    if not found:
        raise UsageError(f"{source} holds neither {ANALYSIS_JSON} nor {METRICS_JSON}: give the folder an evaluation "
                         f"wrote (eval --output-dir, a training run) or one of those files")
    return found.get(ANALYSIS_JSON), found.get(METRICS_JSON)


def redraw_eval(source, out, worst: int = 5, overwrite: bool = False) -> List[Path]:
    """Draw the pictures of a saved evaluation (see :func:`load_eval_source`) into ``out``: all four
    per IoU type from ``analysis.json``, the per-class AP and the sizes from ``metrics.json`` alone.
    Earlier pictures in ``out`` are kept unless ``overwrite``."""
    analysis, metrics = load_eval_source(source)
    if analysis is not None:
        prefixes, stems = ["segm_" if t == "segm" else "" for t in analysis], PICTURES
    else:
        prefixes = [prefix for prefix in ("", "segm_") if prefix + "per_class_AP" in metrics]
        stems = ("per_class_ap", "sizes")
        if not prefixes:
            raise UsageError(f"{source}: no per_class_AP in its metrics.json: not a metrics.json of an evaluation")
    if not overwrite:
        refuse_existing([Path(out) / f"{prefix}{stem}.png" for prefix in prefixes for stem in stems],
                        "pass --overwrite to replace them, or choose another --out")
    check_writable(out, "--out")
    if analysis is not None:
        return sorted(write_eval_pictures(analysis, out, worst).values())
    return sorted(path for prefix in prefixes
                  for path in save_figures(figures(metrics=metrics, prefix=prefix), out, prefix).values())
