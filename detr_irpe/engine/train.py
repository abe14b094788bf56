"""The training loop: AdamW, step or cosine LR, gradient clipping, autocast, gradient accumulation,
activation checkpointing, a weight EMA, checkpoints, exact resume, DDP."""
from __future__ import annotations

import math
import signal
import time
import warnings
from pathlib import Path
from typing import Dict, List, Optional

import torch
from torch import nn
from tqdm import tqdm

from ..config import Config, ConfigError, save_config
from ..data import build_dataloader, build_train_val_datasets, set_epoch
from ..errors import TrainingStopped
from ..evaluation import ClassMismatchWarning, class_mismatch
from ..files import OutputError, free_space
from ..models import build_detr
from ..models.checkpointing import set_activation_checkpointing
from . import distributed as du
from .checkpoint import (load_checkpoint_file, load_for_finetuning, load_frozen_weights, load_model_weights,
                         require_training_checkpoint, state_dict_from_checkpoint)
from .ema import ModelEMA
from .evaluate import evaluate
from .evaluate_panoptic import evaluate_panoptic_model, is_panoptic
from .logger import JsonlWriter, MetricLogger
from .optim import build_optimizer, build_scheduler
from .pretrain import pretrain_for_run
from .run_folder import logged_epochs, prepare_run_folder, set_aside_later_records
from .state import CheckpointKeeper, capture_rng, restore_rng
from .step import train_step
from .stop import StopRequest
from .tensorboard import TensorBoardWriter, validation_pictures


class Trainer:
    """Holds everything a run needs; ``fit()`` trains, evaluates and checkpoints.

    Build it from a validated :class:`Config`. ``resume`` is a checkpoint path written by this
    trainer (``output_dir/checkpoint.pth``): model, optimizer, scheduler, epoch, position in the
    epoch and RNG states are restored, so the continued run equals an uninterrupted one
    (``checkpoint``: that file already read). A new run refuses an output folder that holds
    another run (:func:`~detr_irpe.engine.run_folder.prepare_run_folder`); every listed image
    file must exist before any training time is spent. With ``train.frozen_weights`` the detector
    is frozen (and, in a new run, loaded from that file): only the mask head trains.

    An iteration is an optimizer step over ``train.accumulate`` micro-batches of
    ``train.batch_size`` images (per process): ``iters_per_epoch``, ``step_in_epoch``,
    ``global_step``, the LR schedule, logging, ``max_iters_per_epoch`` and stops on a signal count
    steps. With ``train.ema`` the averaged weights (``ema.module``) are what validation measures,
    ``checkpoint_best.pth`` keeps and a checkpoint's ``model`` holds; the trained ones are under
    ``training_weights`` (see :meth:`state`).
    """

    def __init__(self, cfg: Config, resume: Optional[str] = None, quiet: bool = False,
                 checkpoint: Optional[dict] = None):
        self.cfg = cfg
        t = cfg.train
        self.device = du.init_distributed(t.device)
        self.quiet = quiet or not du.is_main_process()
        if t.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        torch.manual_seed(t.seed + du.get_rank())
        self.output_dir = Path(t.output_dir)
        du.on_main_process(prepare_run_folder, self.output_dir, Path(resume) if resume else None)

        self.train_set, self.val_set = build_train_val_datasets(cfg)  # every image file is there
        if cfg.model.num_classes is None:
            cfg.model.num_classes = self.train_set.num_classes
            self._say(f"num_classes from {cfg.data.train_annotations}: {cfg.model.num_classes}")
        self._report_data()
        self.model, self.criterion, self.postprocessor = build_detr(cfg.model)
        if t.frozen_weights:  # before the optimizer is built: it takes the parameters that train
            self.model.freeze_detr()
        set_activation_checkpointing(self.model, t.activation_checkpointing)
        self.model.to(self.device)
        self.criterion.to(self.device)
        self.optimizer = build_optimizer(self.model, t)
        batches = len(build_dataloader(self.train_set, t.batch_size, train=True))  # per process
        self.iters_per_epoch = batches // t.accumulate  # optimizer steps; a last incomplete one is dropped
        if self.iters_per_epoch == 0:
            raise ConfigError(f"train.accumulate={t.accumulate} needs {t.accumulate} batches of {t.batch_size} "
                              f"per process for one optimizer step, and an epoch has {batches}: lower "
                              f"train.accumulate or train.batch_size")
        if t.max_iters_per_epoch:
            self.iters_per_epoch = min(self.iters_per_epoch, t.max_iters_per_epoch)
        self.scheduler, self.step_lr_every_iteration = build_scheduler(self.optimizer, t, self.iters_per_epoch)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=t.amp == "fp16")
        self.epoch, self.step_in_epoch, self.global_step = 0, 0, 0
        self.best_ap = -1.0
        self.history: List[dict] = []
        self.pending: Optional[dict] = None  # a finished epoch whose evaluation / log line is still to come

        stored_ema = None
        if resume:
            stored_ema = self._resume(resume, checkpoint)
        elif t.frozen_weights:
            report = load_frozen_weights(self.model, t.frozen_weights)
            self._say(f"detector loaded from {t.frozen_weights} and frozen ({len(report.loaded)} tensors); "
                      f"training the mask head only")
        elif t.pretrained:
            report = load_for_finetuning(self.model, state_dict_from_checkpoint(load_checkpoint_file(t.pretrained)))
            self._say(f"initialised from {t.pretrained}: {report}")
        self.ema = self._start_ema(stored_ema, resume)

        self.ddp_model = self.model
        if du.is_distributed():
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp_model = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        self.keeper = CheckpointKeeper(self.output_dir, keep_last=t.keep_last, safetensors=t.save_safetensors)
        du.on_main_process(self._check_free_space)
        self.log = JsonlWriter(self.output_dir / "log.jsonl", enabled=du.is_main_process())
        if resume and du.is_main_process():
            aside = set_aside_later_records(self.log.path, self.epoch)
            if aside is not None:
                self._say(f"log records of epoch {self.epoch} and later (from before this resume) moved to {aside}")
        self.tensorboard = TensorBoardWriter(self.output_dir / "tensorboard", enabled=t.tensorboard and du.is_main_process())
        if du.is_main_process():
            save_config(cfg, self.output_dir / "config.yaml")

    def _say(self, msg: str) -> None:
        if not self.quiet:
            tqdm.write(msg)

    def _report_data(self) -> None:
        """Say once what loading drops from the training annotations, and warn when the validation
        categories are not the training ones (its AP would then measure nothing)."""
        if not du.is_main_process():
            return
        note = self.train_set.dropped_boxes_note()
        if note:
            self._say(f"training data: {note}")
        mismatch = class_mismatch(self.train_set.categories, self.cfg.model.num_classes, self.val_set.categories)
        if mismatch:
            warnings.warn(f"the validation categories ({self.val_set.annotation_file}) are not the training ones "
                          f"({self.train_set.annotation_file}): {mismatch}", ClassMismatchWarning, stacklevel=3)

    def _check_free_space(self) -> None:
        """Refuse to start when the output folder's disk cannot hold one checkpoint (model and
        optimizer state); warn when it cannot hold the ones the run keeps."""
        free = free_space(self.output_dir)
        if free is None:
            return
        tensors = [p for p in self.model.parameters()] + [b for b in self.model.buffers()]
        size = sum(x.numel() * x.element_size() for x in tensors) * (2 if self.cfg.train.ema else 1)
        trained = sum(p.numel() * p.element_size() for p in self.model.parameters() if p.requires_grad)
        checkpoint = size + 2 * trained  # AdamW keeps two moments per trained parameter (and the EMA a copy)
        kept = 2 + self.cfg.train.keep_last  # latest, best, the rolling ones
        mb = lambda n: f"{n / 2**20:.0f} MB"  # noqa: E731
        if free < checkpoint:
            raise OutputError(f"train.output_dir {self.output_dir}: its disk has {mb(free)} free, less than one "
                              f"checkpoint of this model ({mb(checkpoint)}). Free some space or choose another folder")
        if free < kept * checkpoint:
            warnings.warn(f"train.output_dir {self.output_dir}: its disk has {mb(free)} free; the {kept} checkpoints "
                          f"this run keeps take about {mb(kept * checkpoint)}", ResourceWarning, stacklevel=2)

    # ----------------------------------------------------------------- checkpoints
    @property
    def eval_model(self) -> nn.Module:
        """The weights validation measures and inference gets: the EMA's with ``train.ema``."""
        return self.ema.module if self.ema is not None else self.model

    def state(self) -> dict:
        """Everything a resume needs. ``model`` holds the weights to use (``eval_model``: what a
        predict, eval or export of the checkpoint loads, as from an official DETR file); with
        ``train.ema`` the trained weights are under ``training_weights`` and the EMA's update
        count under ``ema``."""
        state = {
            "model": self.eval_model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "global_step": self.global_step,
            "best_ap": self.best_ap,
            "pending_epoch": self.pending,
            "config": self.cfg.to_dict(),
            "categories": self.train_set.categories,
            "rng": capture_rng(),
        }
        if self.ema is not None:
            state["training_weights"] = self.model.state_dict()
            state["ema"] = self.ema.state()
        return state

    def save(self, epoch_end: bool = False, is_best: bool = False) -> None:
        du.sync_buffers(self.model)
        if self.ema is not None:
            du.sync_buffers(self.ema.module)
        if du.is_main_process():
            self.keeper.save(self.state(), epoch_end=epoch_end, is_best=is_best)
        du.barrier()

    def _resume(self, path: str, ckpt: Optional[dict] = None) -> Optional[dict]:
        """Restore the run of ``path``; returns its EMA (``{"weights", "updates"}``) or None."""
        ckpt = ckpt if ckpt is not None else load_checkpoint_file(path)
        require_training_checkpoint(ckpt, path)
        self._check_same_steps(ckpt)
        load_model_weights(self.model, ckpt.get("training_weights", ckpt["model"]), strict=True, source=str(path))
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["lr_scheduler"])
        if "scaler" in ckpt:
            self.scaler.load_state_dict(ckpt["scaler"])
        self.epoch = ckpt["epoch"]
        self.step_in_epoch = ckpt.get("step_in_epoch", 0)
        self.global_step = ckpt.get("global_step", 0)
        self.best_ap = ckpt.get("best_ap", -1.0)
        pending = ckpt.get("pending_epoch")
        # an epoch saved before its evaluation ran (or before its log line was written)
        if pending and pending["record"]["epoch"] not in logged_epochs(self.output_dir / "log.jsonl"):
            self.pending = pending
        restore_rng(ckpt.get("rng"))
        self._apply_new_lr(ckpt.get("config", {}).get("train", {}))
        self._say(f"resumed from {path}: epoch {self.epoch}, iteration {self.step_in_epoch} of the epoch")
        if "training_weights" in ckpt:
            return {"weights": ckpt["model"], "updates": int(ckpt.get("ema", {}).get("updates", 0))}
        return None

    def _check_same_steps(self, ckpt: dict) -> None:
        """A run resumed inside an epoch skips the images its steps took: refuse another number of
        images per step (``batch_size x accumulate``), which would skip the wrong ones."""
        t, saved = self.cfg.train, ckpt.get("config", {}).get("train", {})
        before = saved.get("batch_size", t.batch_size) * saved.get("accumulate", 1)
        if ckpt.get("step_in_epoch", 0) and before != t.batch_size * t.accumulate:
            raise ConfigError(f"this checkpoint stopped inside an epoch after steps of {before} images per process "
                              f"(train.batch_size x train.accumulate); resume with the same product, not "
                              f"{t.batch_size} x {t.accumulate}, or from an epoch's end (checkpoint_epochNNNN.pth)")

    def _start_ema(self, stored: Optional[dict], resume: Optional[str]) -> Optional[ModelEMA]:
        """The EMA of ``train.ema``, from the model's weights as they start, or the resumed run's."""
        settings = self.cfg.train.ema
        if settings is None:
            if stored is not None:
                self._say(f"train.ema=null: the weight average stored in {resume} is dropped; training continues "
                          f"from its trained weights")
            return None
        ema = ModelEMA(self.model, settings.decay, settings.warmup_steps)
        if stored is not None:
            load_model_weights(ema.module, stored["weights"], strict=True, source=f"{resume} (EMA)")
            ema.updates = stored["updates"]
        elif resume:
            self._say(f"train.ema: {resume} holds no weight average; it starts here from the trained weights")
        return ema

    def _apply_new_lr(self, saved_train: dict) -> None:
        """A learning rate given now (config or command line) wins over the checkpoint's."""
        t = self.cfg.train
        for group in self.optimizer.param_groups:
            is_backbone = group.get("name") == "backbone"
            key = "lr_backbone" if is_backbone else "lr"
            new, old = getattr(t, key), saved_train.get(key)
            if old is not None and not math.isclose(new, old):
                if self.step_lr_every_iteration:
                    decay = self.scheduler.lr_lambdas[0](self.scheduler.last_epoch)
                else:
                    decay = 0.1 ** (self.scheduler.last_epoch // t.lr_drop)
                group["initial_lr"] = new
                group["lr"] = new * decay
                self._say(f"train.{key}={new:g} overrides the checkpoint's {old:g} "
                          f"(current {key} after the schedule: {group['lr']:g})")
        self.scheduler.base_lrs = [g["initial_lr"] for g in self.optimizer.param_groups]

    # ----------------------------------------------------------------- loops
    def _train_loader(self):
        t = self.cfg.train
        loader = build_dataloader(self.train_set, t.batch_size, train=True, num_workers=self.cfg.data.num_workers,
                                  seed=t.seed)
        set_epoch(loader, self.epoch, start=self.step_in_epoch * t.accumulate * t.batch_size)
        return loader

    def train_one_epoch(self, stop: StopRequest, deadline: Optional[float] = None) -> Dict[str, float]:
        """One epoch (or the rest of it). Stops early, with ``out_of_time`` in the stats, once
        ``time.time()`` passes ``deadline``."""
        t = self.cfg.train
        self.ddp_model.train()
        self.criterion.train()
        loader = self._train_loader()
        total = len(loader) // t.accumulate + self.step_in_epoch
        if t.max_iters_per_epoch:
            total = min(total, t.max_iters_per_epoch)
        metrics = MetricLogger()
        bar = tqdm(total=total, initial=self.step_in_epoch, desc=f"epoch {self.epoch}", disable=self.quiet,
                   dynamic_ncols=True, leave=False)
        start = time.time()
        out_of_time = False
        for micro_batches in _steps(loader, t.accumulate):
            if self.step_in_epoch >= total:
                break
            if stop.agreed(self.device):  # at a step boundary: a resume continues with the next step
                bar.close()
                return {"stopped": True}
            result = train_step(self.ddp_model, self.criterion, self.optimizer, micro_batches, amp=t.amp,
                                scaler=self.scaler, clip_max_norm=t.clip_max_norm, skip_nonfinite=t.skip_nonfinite,
                                where=f"epoch {self.epoch}, iteration {self.step_in_epoch} "
                                      f"(global step {self.global_step})",
                                normalization=t.loss_normalization, batched_backbone=t.batched_backbone,
                                ema=self.ema, device=self.device)
            if result.skipped:
                self._say("skipping batch: " + result.skipped)
            if self.step_lr_every_iteration:
                self.scheduler.step()
            self.step_in_epoch += 1
            self.global_step += 1
            # every logged number is the mean over processes, the total loss too (NaN where a batch was skipped)
            total_loss = torch.tensor(float("nan") if result.loss is None else result.loss, device=self.device)
            logged = {k: float(v) for k, v in du.reduce_dict({**result.losses, "loss": total_loss}).items()}
            metrics.update(**logged)
            bar.update(1)
            out_of_budget = deadline is not None and time.time() >= deadline
            if self.step_in_epoch < total and du.any_process(out_of_budget, self.device):
                out_of_time = True
                break
            if self.global_step % max(t.log_every, 1) == 0 or self.step_in_epoch == total:
                losses = {k: v for k, v in logged.items() if math.isfinite(v)}
                self.tensorboard.training(losses, {g.get("name", str(i)): g["lr"] for i, g in
                                                   enumerate(self.optimizer.param_groups)}, self.global_step)
                recent = metrics.recent("loss", "class_error")
                bar.set_postfix({k: f"{v:.3f}" for k, v in recent.items()},
                                refresh=False)
        bar.close()
        elapsed = time.time() - start
        stats = metrics.averages()
        stats["iterations"] = self.step_in_epoch
        stats["seconds"] = elapsed
        stats["lr"] = self.optimizer.param_groups[0]["lr"]
        if out_of_time:
            stats["out_of_time"] = True
        return stats

    def evaluate(self, output_dir: Optional[Path] = None, table: bool = True) -> Dict[str, float]:
        """COCO metrics on the validation split; ``table``: print pycocotools' table (unless quiet)."""
        du.sync_buffers(self.eval_model)
        if is_panoptic(self.cfg):  # PQ for a panoptic mask model
            return evaluate_panoptic_model(self.eval_model, None, self.val_set, self.device,
                                           batch_size=self.cfg.train.batch_size, num_workers=self.cfg.data.num_workers,
                                           output_dir=output_dir or self.output_dir, amp=self.cfg.train.amp,
                                           quiet=self.quiet, table=table)
        return evaluate(self.eval_model, self.postprocessor, self.val_set, self.device,
                        batch_size=self.cfg.train.batch_size, num_workers=self.cfg.data.num_workers,
                        output_dir=output_dir or self.output_dir, amp=self.cfg.train.amp, quiet=self.quiet,
                        table=table, backend=self.cfg.eval.backend, pictures=self.cfg.eval.pictures,
                        confusion_threshold=self.cfg.eval.confusion_threshold)

    @property
    def finished(self) -> bool:
        """Every epoch trained, evaluated and logged."""
        return self.epoch >= self.cfg.train.epochs and self.pending is None

    def fit(self) -> dict:
        """Train ``cfg.train.epochs`` epochs (from where a resume left off). Returns the last metrics.

        At the end of each epoch its checkpoint is written first, then the evaluation runs, then
        the log line is written: a failure after the training never loses the epoch, and a resume
        completes what is missing. Each epoch prints one line (loss, class error, and AP / AP50 /
        AP75 after an evaluation); pycocotools' full table is printed once, after the last evaluation.

        Raises:
            TrainingStopped: SIGTERM / SIGINT arrived; the checkpoint was saved first.
        """
        t = self.cfg.train
        last_eval: dict = {}
        deadline = time.time() + 60.0 * t.max_minutes if t.max_minutes else None
        try:
            if self.pending is not None:  # the epoch of the checkpoint we resumed from is not complete
                last_eval = self._complete_epoch() or last_eval
            with StopRequest() as stop:
                while self.epoch < t.epochs:
                    stats = self.train_one_epoch(stop, deadline)
                    if stats.get("stopped"):
                        self._stop(stop.signal_number)
                    out_of_time = self._end_epoch(stats)
                    self.save(epoch_end=True)  # the trained epoch is safe before anything else can fail
                    last_eval = self._complete_epoch() or last_eval
                    if out_of_time:
                        self._say(f"train.max_minutes={t.max_minutes:g} spent: stopped after {self.global_step} "
                                  f"iterations (epoch {self.epoch - 1} cut short at iteration {stats['iterations']})")
                        break
        finally:
            self.tensorboard.close()
        du.cleanup_distributed()
        return last_eval

    def _stop(self, signum: int) -> None:
        self.save()
        name = signal.Signals(signum).name
        raise TrainingStopped(f"stopped by {name} at epoch {self.epoch}, iteration {self.step_in_epoch}: checkpoint "
                              f"saved to {self.keeper.latest}. Continue with: detr-irpe train --resume "
                              f"{self.keeper.latest}", signum, self.keeper.latest)

    def _end_epoch(self, stats: dict) -> bool:
        """Count the epoch as trained and set up its record (``self.pending``); returns whether the
        time budget cut it short."""
        t = self.cfg.train
        finished = self.epoch
        self.epoch += 1
        self.step_in_epoch = 0
        if not self.step_lr_every_iteration:
            self.scheduler.step()
        out_of_time = bool(stats.pop("out_of_time", False))
        record = {"epoch": finished, **{f"train_{k}": v for k, v in stats.items()}}
        if out_of_time:
            record["out_of_time"] = True
        evaluate_now = bool((t.eval_every and self.epoch % t.eval_every == 0) or self.epoch == t.epochs or out_of_time)
        self.pending = {"record": record, "evaluate": evaluate_now}
        return out_of_time

    def _complete_epoch(self) -> dict:
        """Evaluate the pending epoch if due, keep the best checkpoint, then write its log line."""
        t = self.cfg.train
        record, metrics = dict(self.pending["record"]), {}
        is_best = False
        if self.pending["evaluate"]:
            metrics = self.evaluate(table=self.epoch >= t.epochs or record.get("out_of_time", False))
            if self.tensorboard.writer is not None:
                pictures = validation_pictures(self.eval_model, self.postprocessor, self.val_set, self.cfg.data,
                                               t.tensorboard_images, self.device)
                self.tensorboard.evaluation(metrics, pictures, self.global_step)
                self.tensorboard.evaluation_pictures(metrics.get("pictures", {}), self.global_step)
            record.update({f"val_{k}": v for k, v in metrics.items() if isinstance(v, (int, float))})
            ap = metrics.get("PQ" if is_panoptic(self.cfg) else "AP", -1.0)
            is_best = ap > self.best_ap
            self.best_ap = max(self.best_ap, ap)
        self.pending = None
        if is_best:  # checkpoint_best, and the latest again with the new best AP (for a later resume)
            self.save(is_best=True)
        self.log.write(record)
        self.history.append(record)
        self._say(_epoch_line(record))
        return metrics


def _steps(loader, accumulate: int):
    """The loader's batches in lists of ``accumulate`` (one optimizer step each); an incomplete last
    list is dropped, as the loader drops an incomplete last batch."""
    step = []
    for batch in loader:
        step.append(batch)
        if len(step) == accumulate:
            yield step
            step = []


def _epoch_line(record: dict) -> str:
    parts = [f"epoch {record['epoch']}", f"loss {record.get('train_loss', float('nan')):.4f}"]
    if "train_class_error" in record:
        parts.append(f"class_error {record['train_class_error']:.1f}")
    if "val_AP" in record:
        parts.append(f"AP {record['val_AP']:.3f}  AP50 {record['val_AP50']:.3f}  AP75 {record['val_AP75']:.3f}")
    if "val_segm_AP" in record:
        parts.append(f"mask AP {record['val_segm_AP']:.3f}  AP50 {record['val_segm_AP50']:.3f}")
    parts.append(f"{record.get('train_seconds', 0):.0f}s")
    return " | ".join(parts)


def train(cfg: Config, resume: Optional[str] = None) -> dict:
    """Train with ``cfg`` (optionally resuming with exactly ``cfg``), after the backbone pretraining
    the config asks for (:func:`~detr_irpe.engine.pretrain.pretrain_for_run`); returns the final
    evaluation metrics."""
    if resume is None:
        pretrain_for_run(cfg)
    return Trainer(cfg, resume=resume).fit()
