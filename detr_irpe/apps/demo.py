"""The end-to-end demo: synthetic shapes -> a small DETR-iRPE trained on a fixed schedule -> COCO
mAP on the validation split -> pictures, all under one output folder.

The schedule is the config's (``configs/demo.yaml``): ``train.pretrain_iterations`` of the tiny
backbone on which shapes each image holds (:mod:`detr_irpe.engine.pretrain`; DETR itself starts
from an ImageNet backbone, and from scratch it needs far more than a CPU demo to leave its
predict-the-same-boxes plateau), then ``train.epochs`` of DETR training. Every machine trains
the same model, so the AP a user gets is the README's, up to floating-point differences between
CPUs. ``budget_minutes`` is an optional cap on pretraining + training; a run it cuts short says
so. The same code uses a GPU when ``train.device=auto`` finds one.

With ``masks`` (``demo --masks``) a third stage follows, DETR's second stage of instance
segmentation: the mask head trained on the demo's detector, frozen (``train.frozen_weights``),
on the fixed schedule :data:`MASK_STAGE`, into ``<output_dir>/masks``; then mask AP and pictures
with the masks drawn.

    from detr_irpe.apps.demo import DemoSettings, run_demo
    summary = run_demo(DemoSettings(overrides=["model.rpe=null"]))
    summary = run_demo(DemoSettings(masks=True))      # summary["masks"]: mask AP, iterations, paths
    summary = run_demo(DemoSettings(panoptic=True))   # summary["masks"]: PQ / SQ / RQ, iterations, paths

With ``panoptic`` (``demo --panoptic``) the data is the synthetic panoptic variant (stuff bands behind
the shapes, as COCO panoptic json + PNGs, in ``<data_root>_panoptic``): the detector learns things
and stuff on the longer schedule :data:`PANOPTIC_STAGE`, the mask stage follows as for ``masks``,
and the evaluation is PQ (official DETR's panoptic post-processing, threshold 0.85,
:mod:`detr_irpe.engine.evaluate_panoptic`).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import List, Optional, Sequence

from ..config import CONFIG_DIR, Config, apply_overrides, load_config, validate
from ..data import ensure_synthetic_dataset
from ..data.coco import resolve
from ..engine.distributed import pick_device
from ..engine.evaluate_panoptic import is_panoptic
from ..engine.inference import load_detector
from ..engine.pretrain import pretrain_for_run
from ..engine.run_folder import run_files
from ..engine.train import Trainer
from ..errors import InputNotFoundError, UsageError
from ..files import atomic_write_json, fresh_folder
from . import pictures
from .predict_panoptic import predict_panoptic

DEFAULT_CONFIG = CONFIG_DIR / "demo.yaml"
MASKS_FOLDER = "masks"  # the mask stage's run, inside the demo's output folder
PANOPTIC_METRICS = ("PQ", "SQ", "RQ", "PQ_th", "SQ_th", "RQ_th", "PQ_st", "SQ_st", "RQ_st")
# The mask stage of ``demo --masks``: the demo's config (and the user's overrides) with these on top,
# the same schedule on every machine. Only the mask head trains (3 epochs x 500 iterations of batch 8,
# half the detector's 3000); benchmarks/README.md has the run behind these values.
MASK_STAGE = {
    "model.masks": "true",
    "model.query_groups": 1,  # one mask per query of DETR (the detector's extra training groups are left out)
    "model.backbone_weights": "none",  # the frozen detector's checkpoint holds the backbone
    "train.pretrain_iterations": 0,
    "train.epochs": 3,
    "train.lr": 1.0e-3,
    "train.lr_schedule": "cosine",
    "train.warmup_iters": 100,
    "train.eval_every": 0,  # evaluated once, at the end
}


# The detector of ``demo --panoptic`` (its mask stage is MASK_STAGE's): its images hold up to 6 shapes
# and 3 stuff segments, where the detection demo's hold up to 6 shapes, so twice the queries, the
# pretraining and the epochs of demo.yaml (6000 iterations); benchmarks/README.md has the runs behind them.
PANOPTIC_STAGE = {
    "model.num_queries": 24,
    "train.pretrain_iterations": 600,
    "train.epochs": 12,
}


@dataclass
class DemoSettings:
    """What the demo does besides the model / data / train config (``config`` + ``overrides``)."""

    config: Optional[str] = None  # YAML config; None: the shipped demo.yaml
    overrides: List[str] = field(default_factory=list)  # key=value, e.g. model.rpe=null
    output_dir: str = "outputs/demo"
    data_root: str = "data/synthetic"
    budget_minutes: Optional[float] = None  # optional cap on pretraining + training wall time
    num_train: int = 4000
    num_val: int = 500
    image_size: int = 128
    max_objects: int = 6
    data_seed: int = 0
    num_pictures: int = 6  # validation images drawn with predictions vs ground truth
    pictures: bool = True
    max_iterations: Optional[int] = None  # cap on training iterations (tests, quick looks)
    max_pretrain_iterations: Optional[int] = None  # cap on backbone pretraining iterations (same)
    masks: bool = False  # then train the mask head on the frozen detector (MASK_STAGE), evaluate mask AP
    panoptic: bool = False  # the panoptic variant of the data; implies the mask stage, evaluated by PQ
    detector: Optional[str] = None  # with masks: freeze this detection checkpoint instead of training one
    quiet: bool = False


def _say(settings: DemoSettings, msg: str) -> None:
    if not settings.quiet:
        print(msg, flush=True)


def panoptic_root(settings: DemoSettings) -> str:
    """Where the demo's data goes: ``data_root``, or for the panoptic variant ``<data_root>_panoptic``."""
    return f"{settings.data_root.rstrip('/')}_panoptic" if settings.panoptic else settings.data_root


def build_demo_config(settings: DemoSettings, layout=None) -> Config:
    """The config file (with :data:`PANOPTIC_STAGE` on top for the panoptic variant) and the overrides,
    pointed at the generated data (``layout``) and the demo's output folder; with ``layout=None`` it
    only checks the config, before any data is made."""
    recipe = [f"{k}={v}" for k, v in PANOPTIC_STAGE.items()] if settings.panoptic else []
    cfg = load_config(settings.config or DEFAULT_CONFIG, recipe + settings.overrides)
    if layout is not None:
        apply_overrides(cfg, layout.config_overrides() + [f"model.num_classes={layout.num_classes}",
                                                          f"train.output_dir={settings.output_dir}"])
        apply_overrides(cfg, settings.overrides)  # the user's word wins
        validate(cfg)
    return cfg


def cap_schedule(cfg: Config, iters_per_epoch: int, max_iterations: Optional[int]) -> int:
    """Limit training to ``max_iterations`` (None: the config's epochs); returns the planned iterations."""
    t = cfg.train
    if max_iterations is not None and max_iterations < t.epochs * iters_per_epoch:
        if max_iterations < iters_per_epoch:
            t.epochs, t.max_iters_per_epoch = 1, max_iterations
            iters_per_epoch = max_iterations
        else:
            t.epochs = max_iterations // iters_per_epoch
        t.warmup_iters = min(t.warmup_iters, max(t.epochs * iters_per_epoch // 10, 1))
    return t.epochs * iters_per_epoch


def draw_pictures(checkpoint: Path, out: Path, cfg: Config, num_images: int, quiet: bool = True) -> dict:
    """Predictions vs ground truth on the first validation images, encoder / decoder attention,
    the learned iRPE tables (iRPE models only) and the training curves. Returns the paths."""
    device = pick_device(cfg.train.device, "train.device")
    written = {"boxes": [str(p) for p in pictures.draw_boxes(str(checkpoint), out / "boxes", val=num_images,
                                                             threshold=0.5, min_size=384, device=device)]}
    written["attention"] = [str(p) for p in pictures.draw_attention(
        str(checkpoint), out / "attention", val=min(num_images, 3), threshold=0.5, min_size=256, device=device,
        layer="all")]
    if cfg.model.rpe:
        written["rpe_tables"] = [str(p) for p in pictures.draw_rpe_tables(str(checkpoint), out, val=1, device=device)]
    log = Path(cfg.train.output_dir) / "log.jsonl"
    if log.is_file():
        written["training_curves"] = [str(pictures.plot_logs([log], out / "training_curves.png",
                                                              title="demo training run"))]
    return written


def mask_stage_config(cfg: Config, detector: Path, output_dir: Path) -> Config:
    """The mask stage's config: the demo's ``cfg`` (data, model sizes, the user's overrides; changed
    in place) with :data:`MASK_STAGE` on top, freezing ``detector`` and writing to ``output_dir``."""
    apply_overrides(cfg, [f"{k}={v}" for k, v in MASK_STAGE.items()]
                    + [f"train.frozen_weights={detector}", f"train.output_dir={output_dir}"])
    return validate(cfg)


def draw_panoptic_pictures(checkpoint: Path, cfg: Config, out: Path, num_images: int, device: str) -> List[str]:
    """The panoptic maps (with their legends) of the first ``num_images`` validation images."""
    images = sorted(p for p in resolve(cfg.data.root, cfg.data.val_images).iterdir() if p.suffix == ".jpg")
    detector = load_detector(str(checkpoint), device=device)
    return [r["picture"] for r in predict_panoptic(detector, images[:num_images], out)]


def train_mask_head(settings: DemoSettings, cfg: Config, detector: Path) -> dict:
    """The mask stage: :data:`MASK_STAGE` on the frozen ``detector``, into ``<output_dir>/masks``; mask
    AP, box AP (the detector's, unchanged), iterations, timings and paths. ``cfg``: the demo's config
    as :func:`build_demo_config` gives it (a fresh one: the detector's stage changes its own)."""
    start = time.time()
    mask_cfg = mask_stage_config(cfg, detector, Path(settings.output_dir) / MASKS_FOLDER)
    planned = cap_schedule(mask_cfg, settings.num_train // mask_cfg.train.batch_size, settings.max_iterations)
    trainer = Trainer(mask_cfg, quiet=settings.quiet)
    _say(settings, f"[demo] mask head on the frozen detector {detector}: {mask_cfg.train.epochs} epochs x "
                   f"{trainer.iters_per_epoch} iterations (batch {mask_cfg.train.batch_size}) = {planned} iterations, "
                   f"lr {mask_cfg.train.lr:g} {mask_cfg.train.lr_schedule}")
    metrics = trainer.fit()
    seconds_training = time.time() - start
    out = Path(mask_cfg.train.output_dir)
    checkpoint = out / "checkpoint.pth"
    drawn: dict = {}
    if settings.pictures:
        device = pick_device(mask_cfg.train.device, "train.device")
        drawn["boxes"] = [str(p) for p in pictures.draw_boxes(str(checkpoint), out / "pictures" / "boxes",
                                                              val=settings.num_pictures, threshold=0.5, min_size=384,
                                                              device=device)]
        if is_panoptic(mask_cfg):
            drawn["panoptic"] = draw_panoptic_pictures(checkpoint, mask_cfg, out / "pictures" / "panoptic",
                                                       settings.num_pictures, device)
    panoptic = {k: metrics.get(k) for k in PANOPTIC_METRICS if k in metrics}
    return {
        **panoptic, "PQ_per_class": metrics.get("PQ_per_class"),
        "segm_AP": metrics.get("segm_AP"), "segm_AP50": metrics.get("segm_AP50"),
        "segm_AP75": metrics.get("segm_AP75"), "AP": metrics.get("AP"), "AP50": metrics.get("AP50"),
        "iterations": trainer.global_step, "planned_iterations": planned, "detector": str(detector),
        "seconds": {"training": seconds_training, "total": time.time() - start},
        "paths": {"output_dir": str(out), "checkpoint": str(checkpoint), "config": str(out / "config.yaml"),
                  "metrics": str(out / "metrics.json"), "segm_detections": str(out / "segm_detections.json"),
                  "log": str(out / "log.jsonl"), "pictures": drawn},
    }


def run_demo(settings: DemoSettings) -> dict:
    """Generate the data, pretrain and train on the config's schedule, evaluate, draw (with ``masks``,
    then the mask stage, :func:`train_mask_head`); returns (and writes to
    ``<output_dir>/demo_summary.json``) the metrics, iteration counts, timings and paths."""
    build_demo_config(settings)  # a bad config or override fails here, before any work
    if settings.panoptic:
        settings = replace(settings, masks=True)
    if settings.detector is not None:
        if not settings.masks:
            raise UsageError("--detector names the detection checkpoint whose mask head --masks trains: add --masks")
        if not Path(settings.detector).is_file():
            raise InputNotFoundError(f"--detector {settings.detector}: no such checkpoint (a demo run writes "
                                     f"<output_dir>/checkpoint.pth)")
    if run_files(Path(settings.output_dir)) or run_files(Path(settings.output_dir) / MASKS_FOLDER):
        earlier, settings = settings.output_dir, replace(settings, output_dir=str(fresh_folder(settings.output_dir)))
        _say(settings, f"[demo] {earlier} holds an earlier run, kept as it is; this run goes to {settings.output_dir}")
    t0 = time.time()
    layout = ensure_synthetic_dataset(panoptic_root(settings), settings.num_train, settings.num_val,
                                      settings.image_size, settings.data_seed, max_objects=settings.max_objects,
                                      panoptic=settings.panoptic)
    t_data = time.time() - t0
    _say(settings, f"[demo] synthetic data in {layout.root} ({settings.num_train} train / {settings.num_val} val "
                   f"images, {settings.image_size} px; {'generated' if layout.generated else 'cached'}) "
                   f"in {t_data:.1f}s")

    cfg = build_demo_config(settings, layout)
    if settings.detector is None:
        summary = _train_detector(settings, cfg, layout)
        summary["seconds"]["data"] = t_data
        detector = Path(summary["paths"]["checkpoint"])
    else:
        detector = Path(settings.detector)
        summary = {"AP": None, "AP50": None, "AP75": None, "rpe": cfg.model.rpe, "iterations": 0,
                   "detector": str(detector), "seconds": {"data": t_data},
                   "paths": {"output_dir": settings.output_dir, "data": str(layout.root), "pictures": {}}}
    if settings.masks:
        summary["masks"] = train_mask_head(settings, build_demo_config(settings, layout), detector)
    summary["seconds"]["total"] = time.time() - t0
    summary["settings"] = asdict(settings)
    atomic_write_json(Path(settings.output_dir) / "demo_summary.json", summary, indent=2)
    _print_summary(settings, summary)
    return summary


def _train_detector(settings: DemoSettings, cfg: Config, layout) -> dict:
    """The detection demo: pretraining, training, evaluation, pictures; the summary's entries."""
    budget = None if settings.budget_minutes is None else 60.0 * settings.budget_minutes
    _say(settings, f"[demo] model: {cfg.model.backbone} backbone, d={cfg.model.hidden_dim}, "
                   f"{cfg.model.enc_layers}+{cfg.model.dec_layers} layers, {cfg.model.num_queries} queries, "
                   f"encoder {'iRPE ' + cfg.model.rpe if cfg.model.rpe else 'plain (no iRPE)'}")
    t_pretrain = time.time()
    pretrain = pretrain_for_run(cfg, budget, settings.max_pretrain_iterations, quiet=settings.quiet)
    t_pretrain = time.time() - t_pretrain
    if budget is not None:
        cfg.train.max_minutes = max(budget - t_pretrain, 1.0) / 60.0

    t_train = time.time()
    planned = cap_schedule(cfg, settings.num_train // cfg.train.batch_size, settings.max_iterations)
    trainer = Trainer(cfg, quiet=settings.quiet)
    _say(settings, f"[demo] training: {cfg.train.epochs} epochs x {trainer.iters_per_epoch} iterations "
                   f"(batch {cfg.train.batch_size}) = {planned} iterations")
    metrics = trainer.fit()
    t_train = time.time() - t_train
    out = Path(cfg.train.output_dir)
    checkpoint = out / "checkpoint.pth"
    planned_pretrain = cfg.train.pretrain_iterations if pretrain else 0
    cut_short = trainer.global_step < planned or (pretrain is not None and pretrain.iterations < planned_pretrain)
    if cut_short:
        done = f"stopped at iteration {trainer.global_step} of {planned}"
        if pretrain is not None and pretrain.iterations < planned_pretrain:
            done = f"pretraining stopped at iteration {pretrain.iterations} of {planned_pretrain}, training {done}"
        _say(settings, f"[demo] the {settings.budget_minutes:g}-minute cap cut the schedule short: {done}; "
                       f"the AP below is not the demo's")

    pictures_written: dict = {}
    t_pictures = time.time()
    if settings.pictures:
        pictures_written = draw_pictures(checkpoint, out / "pictures", cfg, settings.num_pictures,
                                         quiet=settings.quiet)
    t_pictures = time.time() - t_pictures
    return {
        "AP": metrics.get("AP"), "AP50": metrics.get("AP50"), "AP75": metrics.get("AP75"),
        "rpe": cfg.model.rpe,
        "iterations": trainer.global_step,
        "planned_iterations": planned,
        "pretrain_iterations": pretrain.iterations if pretrain else 0,
        "cut_short": cut_short,
        "epochs_completed": trainer.epoch,
        "backbone_pretraining": asdict(pretrain) if pretrain else None,
        "seconds": {"pretraining": t_pretrain, "training": t_train, "pictures": t_pictures},
        "budget_minutes": settings.budget_minutes,
        "device": str(trainer.device),
        "paths": {
            "output_dir": str(out), "checkpoint": str(checkpoint), "config": str(out / "config.yaml"),
            "metrics": str(out / "metrics.json"), "detections": str(out / "detections.json"),
            "log": str(out / "log.jsonl"), "data": str(layout.root), "pictures": pictures_written,
        },
    }


def _print_summary(settings: DemoSettings, s: dict) -> None:
    if settings.quiet:
        return
    p = s["paths"]
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    lines = ["", "=" * 72]
    if s.get("detector") is None:
        lines += [
            f"demo finished in {s['seconds']['total'] / 60:.1f} min on {s['device']}: "
            f"{s['pretrain_iterations']} pretraining + {s['iterations']} training iterations"
            + (f" of {s['planned_iterations']} (cut short by the {s['budget_minutes']:g}-minute cap)" if s["cut_short"]
               else "")
            + (f" + {s['masks']['iterations']} mask-head iterations" if "masks" in s else ""),
            f"  encoder: {'iRPE ' + s['rpe'] if s['rpe'] else 'plain (no iRPE)'}",
            f"  COCO bbox on the synthetic val split: AP {fmt(s['AP'])}  AP50 {fmt(s['AP50'])}  AP75 {fmt(s['AP75'])}",
            f"  checkpoint   {p['checkpoint']}",
            f"  config       {p['config']}",
            f"  metrics      {p['metrics']}",
            f"  training log {p['log']}",
        ]
    else:
        lines.append(f"demo finished in {s['seconds']['total'] / 60:.1f} min: {s['masks']['iterations']} mask-head "
                     f"iterations on the frozen detector {s['detector']}")
    if "masks" in s and s["masks"].get("PQ") is not None:
        m = s["masks"]
        lines += [
            f"  panoptic quality on the synthetic val split: PQ {fmt(m['PQ'])}  SQ {fmt(m['SQ'])}  "
            f"RQ {fmt(m['RQ'])}; things PQ {fmt(m['PQ_th'])}, stuff PQ {fmt(m['PQ_st'])} (mask head: "
            f"{m['iterations']} iterations, {m['seconds']['total'] / 60:.1f} min)",
            "  per class PQ: " + ", ".join(f"{k} {v:.3f}" for k, v in (m.get("PQ_per_class") or {}).items()),
            f"  mask model   {m['paths']['checkpoint']}",
            f"  mask metrics {m['paths']['metrics']}",
        ]
    elif "masks" in s:
        m = s["masks"]
        lines += [
            f"  COCO segm (masks) on the synthetic val split: AP {fmt(m['segm_AP'])}  AP50 {fmt(m['segm_AP50'])}  "
            f"AP75 {fmt(m['segm_AP75'])} (mask head: {m['iterations']} iterations, "
            f"{m['seconds']['total'] / 60:.1f} min)",
            f"  mask model   {m['paths']['checkpoint']}",
            f"  mask metrics {m['paths']['metrics']}",
        ]
    lines += [
        f"  summary      {Path(p['output_dir']) / 'demo_summary.json'}",
        f"  data         {p['data']}",
    ]
    for kind, files in p["pictures"].items():
        folder = str(Path(files[0]).parent) if files else ""
        lines.append(f"  pictures     {kind}: {len(files)} file(s) in {folder}")
    for kind, files in s.get("masks", {}).get("paths", {}).get("pictures", {}).items():
        folder = str(Path(files[0]).parent) if files else ""
        lines.append(f"  pictures     masks ({kind}): {len(files)} file(s) in {folder}")
    lines += ["=" * 72]
    print("\n".join(lines), flush=True)


def run_compare(settings: DemoSettings, variants: Sequence[tuple] = (("irpe", []), ("plain", ["model.rpe=null"]))
                ) -> dict:
    """The demo once per variant (same data, seed and schedule), each in ``<output_dir>/<name>``."""
    results = {}
    for name, extra in variants:
        one = DemoSettings(**{**asdict(settings), "output_dir": str(Path(settings.output_dir) / name),
                              "overrides": list(settings.overrides) + list(extra)})
        results[name] = run_demo(one)
    return results
