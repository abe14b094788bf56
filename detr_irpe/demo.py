"""The end-to-end demo: synthetic shapes -> a small DETR-iRPE trained for a fixed wall-clock
budget -> COCO mAP on the validation split -> pictures, all under one output folder.

The budget covers everything after installation: generating the data, pretraining the tiny
backbone on which shapes each image holds (:mod:`detr_irpe.engine.pretrain`; DETR itself starts
from an ImageNet backbone, and from scratch it needs far more than 15 CPU minutes to leave its
predict-the-same-boxes plateau), training, evaluating and drawing. Training gets what is left after a reserve for the evaluation and the pictures; its
length is planned from a short timing of real training iterations, so the cosine learning-rate
schedule ends when the budget does, and ``train.max_minutes`` stops it should the machine
slow down. The same code uses a GPU when ``train.device=auto`` finds one (more iterations fit;
``train.epochs`` of the config caps them).

    from detr_irpe.demo import DemoSettings, run_demo
    summary = run_demo(DemoSettings(budget_minutes=5, overrides=["model.rpe=null"]))
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence

import torch

from .config import Config, load_config
from .data import build_dataloader, build_train_val_datasets, ensure_synthetic_dataset, set_epoch
from .engine import distributed as du
from .engine.pretrain import PretrainResult, pretrain_backbone
from .engine.train import Trainer, autocast_context, build_optimizer, to_device
from .models import build_detr

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


@dataclass
class DemoSettings:
    """What the demo does besides the model / data / train config (``config`` + ``overrides``)."""

    config: Optional[str] = None  # YAML config; None: configs/demo.yaml of this checkout
    overrides: List[str] = field(default_factory=list)  # key=value, e.g. model.rpe=null
    output_dir: str = "outputs/demo"
    data_root: str = "data/synthetic"
    budget_minutes: float = 15.0  # data + training + evaluation + pictures
    num_train: int = 4000
    num_val: int = 500
    image_size: int = 128
    max_objects: int = 6
    data_seed: int = 0
    num_pictures: int = 6  # validation images drawn with predictions vs ground truth
    pictures: bool = True
    max_iterations: Optional[int] = None  # cap on training iterations (tests, quick looks)
    max_pretrain_iterations: Optional[int] = None  # cap on backbone pretraining iterations (same)
    reserve_seconds: float = 40.0  # kept back from training for evaluation and pictures
    pretrain_fraction: float = 0.1  # of the budget, for backbone pretraining on image-level labels (0: none)
    quiet: bool = False


def _say(settings: DemoSettings, msg: str) -> None:
    if not settings.quiet:
        print(msg, flush=True)


def build_demo_config(settings: DemoSettings, layout) -> Config:
    """The config file, pointed at the generated data and the demo's output folder, then the overrides."""
    path = settings.config or DEFAULT_CONFIG
    overrides = layout.config_overrides() + [f"model.num_classes={layout.num_classes}",
                                             f"train.output_dir={settings.output_dir}"]
    return load_config(path, overrides + list(settings.overrides))


def _pretrain(settings: DemoSettings, cfg: Config) -> Optional[PretrainResult]:
    """Pretrain a from-scratch tiny backbone on the data's image-level labels (as DETR starts from
    an ImageNet backbone) and point ``cfg.model.backbone_weights`` at the result."""
    if settings.pretrain_fraction <= 0 or cfg.model.backbone != "tiny" or cfg.model.backbone_weights != "none":
        return None
    result = pretrain_backbone(cfg, str(Path(settings.output_dir) / "backbone_pretrained.pth"),
                               seconds=60.0 * settings.budget_minutes * settings.pretrain_fraction,
                               iterations=settings.max_pretrain_iterations, quiet=settings.quiet)
    cfg.model.backbone_weights = result.path
    _say(settings, f"[demo] backbone pretrained on which shapes each image holds: {result.iterations} iterations "
                   f"in {result.seconds:.0f}s, loss {result.first_loss:.3f} -> {result.last_loss:.3f}")
    return result


def time_iterations(cfg: Config, num_iterations: int = 12, warmup: int = 2) -> float:
    """Seconds per training iteration of ``cfg``'s model on its data (a throw-away model and
    optimizer; data loading included): the lower quartile of ``num_iterations`` timed steps, so
    that a moment of contention from other processes does not shorten the whole plan."""
    device = du.init_distributed(cfg.train.device)
    train_set, _ = build_train_val_datasets(cfg)
    model, criterion, _ = build_detr(cfg.model)
    model.to(device).train()
    criterion.to(device)
    optimizer = build_optimizer(model, cfg.train)
    loader = build_dataloader(train_set, cfg.train.batch_size, train=True, num_workers=cfg.data.num_workers,
                              seed=cfg.train.seed + 1)
    set_epoch(loader, 0)
    times: List[float] = []
    start = time.perf_counter()
    for i, (images, masks, targets) in enumerate(loader):
        images, masks, targets = to_device(images, masks, targets, device)
        with autocast_context(device, cfg.train.amp):
            outputs = model(images, masks)
        loss = criterion.weighted_loss(criterion(outputs, targets))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        now = time.perf_counter()
        if i >= warmup:
            times.append(now - start)
        start = now
        if len(times) >= num_iterations:
            break
    return sorted(times)[len(times) // 4]


def plan_schedule(cfg: Config, seconds_per_iteration: float, train_seconds: float, iters_per_epoch: int,
                  max_iterations: Optional[int] = None) -> dict:
    """Epochs (at most the config's), iterations per epoch and evaluation interval that fit
    ``train_seconds``. Sets them on ``cfg.train`` and returns the plan."""
    t = cfg.train
    fit = max(int(train_seconds / seconds_per_iteration), 1)
    if max_iterations is not None:
        fit = min(fit, max_iterations)
    if fit < iters_per_epoch:  # less than one pass over the data: shorter epochs
        t.max_iters_per_epoch = fit
        iters_per_epoch = fit
    epochs = max(1, min(t.epochs, fit // iters_per_epoch))
    t.epochs = epochs
    t.max_minutes = train_seconds / 60.0
    t.eval_every = max(1, math.ceil(epochs / 5))  # about five points on the AP curve
    t.warmup_iters = min(t.warmup_iters, max(epochs * iters_per_epoch // 10, 1))
    return {"seconds_per_iteration": seconds_per_iteration, "train_seconds": train_seconds,
            "epochs": epochs, "iterations_per_epoch": iters_per_epoch,
            "planned_iterations": epochs * iters_per_epoch, "eval_every": t.eval_every}


def draw_pictures(checkpoint: Path, out: Path, cfg: Config, num_images: int, quiet: bool = True) -> dict:
    """Predictions vs ground truth on the first validation images, encoder / decoder attention,
    the learned iRPE tables (iRPE models only) and the training curves. Returns the paths."""
    from .visualize import commands

    device = "cuda" if torch.cuda.is_available() and cfg.train.device != "cpu" else "cpu"
    written = {"boxes": [str(p) for p in commands.draw_boxes(str(checkpoint), out / "boxes", val=num_images,
                                                             threshold=0.5, min_size=384, device=device)]}
    written["attention"] = [str(p) for p in commands.draw_attention(
        str(checkpoint), out / "attention", val=min(num_images, 3), threshold=0.5, min_size=256, device=device,
        layer="all")]
    if cfg.model.rpe:
        written["rpe_tables"] = [str(p) for p in commands.draw_rpe_tables(str(checkpoint), out, val=1, device=device)]
    log = Path(cfg.train.output_dir) / "log.jsonl"
    if log.is_file():
        written["training_curves"] = [str(commands.plot_logs([log], out / "training_curves.png",
                                                              title="demo training run"))]
    return written


def run_demo(settings: DemoSettings) -> dict:
    """Generate the data, train within the budget, evaluate, draw; returns (and writes to
    ``<output_dir>/demo_summary.json``) the metrics, timings and paths."""
    t0 = time.time()
    budget = 60.0 * settings.budget_minutes
    layout = ensure_synthetic_dataset(settings.data_root, settings.num_train, settings.num_val,
                                      settings.image_size, settings.data_seed, max_objects=settings.max_objects)
    t_data = time.time() - t0
    _say(settings, f"[demo] synthetic data in {layout.root} ({settings.num_train} train / {settings.num_val} val "
                   f"images, {settings.image_size} px; {'generated' if layout.generated else 'cached'}) "
                   f"in {t_data:.1f}s")

    cfg = build_demo_config(settings, layout)
    pretrain = _pretrain(settings, cfg)
    seconds_per_iteration = time_iterations(cfg)
    iters_per_epoch = settings.num_train // cfg.train.batch_size
    train_seconds = max(budget - (time.time() - t0) - settings.reserve_seconds, 1.0)
    plan = plan_schedule(cfg, seconds_per_iteration, train_seconds, iters_per_epoch, settings.max_iterations)
    _say(settings, f"[demo] model: {cfg.model.backbone} backbone, d={cfg.model.hidden_dim}, "
                   f"{cfg.model.enc_layers}+{cfg.model.dec_layers} layers, {cfg.model.num_queries} queries, "
                   f"encoder {'iRPE ' + cfg.model.rpe if cfg.model.rpe else 'plain (no iRPE)'}")
    _say(settings, f"[demo] {seconds_per_iteration * 1000:.0f} ms per iteration (batch {cfg.train.batch_size}): "
                   f"{plan['epochs']} epochs x {plan['iterations_per_epoch']} iterations planned in "
                   f"{train_seconds / 60:.1f} min of training")

    t_train = time.time()
    trainer = Trainer(cfg, quiet=settings.quiet)
    metrics = trainer.fit()
    t_train = time.time() - t_train
    out = Path(cfg.train.output_dir)
    checkpoint = out / "checkpoint.pth"

    pictures: dict = {}
    t_pictures = time.time()
    if settings.pictures:
        pictures = draw_pictures(checkpoint, out / "pictures", cfg, settings.num_pictures, quiet=settings.quiet)
    t_pictures = time.time() - t_pictures

    summary = {
        "AP": metrics.get("AP"), "AP50": metrics.get("AP50"), "AP75": metrics.get("AP75"),
        "rpe": cfg.model.rpe,
        "iterations": trainer.global_step,
        "epochs_completed": trainer.epoch,
        "plan": plan,
        "backbone_pretraining": asdict(pretrain) if pretrain else None,
        "seconds": {"data": t_data, "training": t_train, "pictures": t_pictures, "total": time.time() - t0},
        "budget_minutes": settings.budget_minutes,
        "device": str(trainer.device),
        "paths": {
            "output_dir": str(out), "checkpoint": str(checkpoint), "config": str(out / "config.yaml"),
            "metrics": str(out / "metrics.json"), "detections": str(out / "detections.json"),
            "log": str(out / "log.jsonl"), "data": str(layout.root), "pictures": pictures,
        },
        "settings": asdict(settings),
    }
    (out / "demo_summary.json").write_text(json.dumps(summary, indent=2))
    _print_summary(settings, summary)
    return summary


def _print_summary(settings: DemoSettings, s: dict) -> None:
    if settings.quiet:
        return
    p = s["paths"]
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    lines = [
        "",
        "=" * 72,
        f"demo finished in {s['seconds']['total'] / 60:.1f} min on {s['device']} "
        f"(budget {s['budget_minutes']:g} min; {s['iterations']} training iterations)",
        f"  encoder: {'iRPE ' + s['rpe'] if s['rpe'] else 'plain (no iRPE)'}",
        f"  COCO bbox on the synthetic val split: AP {fmt(s['AP'])}  AP50 {fmt(s['AP50'])}  AP75 {fmt(s['AP75'])}",
        f"  checkpoint   {p['checkpoint']}",
        f"  config       {p['config']}",
        f"  metrics      {p['metrics']}",
        f"  training log {p['log']}",
        f"  summary      {Path(p['output_dir']) / 'demo_summary.json'}",
        f"  data         {p['data']}",
    ]
    for kind, files in p["pictures"].items():
        folder = str(Path(files[0]).parent) if files else ""
        lines.append(f"  pictures     {kind}: {len(files)} file(s) in {folder}")
    lines += ["=" * 72]
    print("\n".join(lines), flush=True)


def run_compare(settings: DemoSettings, variants: Sequence[tuple] = (("irpe", []), ("plain", ["model.rpe=null"]))
                ) -> dict:
    """The demo once per variant (same data, seed and budget), each in ``<output_dir>/<name>``."""
    results = {}
    for name, extra in variants:
        one = DemoSettings(**{**asdict(settings), "output_dir": str(Path(settings.output_dir) / name),
                              "overrides": list(settings.overrides) + list(extra)})
        results[name] = run_demo(one)
    return results
