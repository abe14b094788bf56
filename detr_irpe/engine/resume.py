"""Continuing a training run: its own config (stored in the checkpoint), overrides on top, in its folder."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Sequence

from ..config import Config, apply_overrides, config_from_dict, load_config, override_keys, validate
from ..errors import CheckpointError
from . import distributed as du
from .checkpoint import load_checkpoint_file, require_training_checkpoint
from .train import Trainer


def _flat(config_dict: dict) -> Dict[str, object]:
    return {f"{section}.{key}": value for section, values in config_dict.items() for key, value in values.items()}


def config_changes(before: dict, after: dict) -> List[str]:
    """``section.key: old -> new`` for every setting that differs between two ``Config.to_dict()``s."""
    old, new = _flat(before), _flat(after)
    return [f"{key}: {old.get(key)!r} -> {new[key]!r}" for key in new if old.get(key) != new[key]]


def resume_config(ckpt: dict, checkpoint: str, config_path: Optional[str] = None,
                  overrides: Sequence[str] = ()) -> Config:
    """The config a resumed run continues with: the run's own (stored in the checkpoint), or
    ``config_path``, with ``overrides`` on top; it writes into the checkpoint's folder unless
    ``train.output_dir`` is overridden."""
    require_training_checkpoint(ckpt, checkpoint)
    if config_path is not None:
        cfg = load_config(config_path, overrides)
    elif isinstance(ckpt.get("config"), dict):
        cfg = apply_overrides(config_from_dict(ckpt["config"]), overrides)
        validate(cfg)
    else:
        raise CheckpointError(f"{checkpoint} stores no config of this project (not written by detr-irpe train): "
                              f"give the run's --config to resume it")
    if "train.output_dir" not in override_keys(overrides):
        cfg.train.output_dir = str(Path(checkpoint).parent)
    return cfg


def resume_training(checkpoint: str, config_path: Optional[str] = None, overrides: Sequence[str] = (),
                    quiet: bool = False) -> dict:
    """Continue the run of ``checkpoint`` (see :func:`resume_config`), saying which settings changed;
    a run that already finished says so and trains nothing. Returns the final evaluation metrics
    (``{"finished_before": True}`` for a finished run)."""
    ckpt = load_checkpoint_file(checkpoint)
    cfg = resume_config(ckpt, checkpoint, config_path, overrides)
    trainer = Trainer(cfg, resume=checkpoint, quiet=quiet, checkpoint=ckpt)
    changes = config_changes(ckpt.get("config") or {}, cfg.to_dict())
    if changes:
        trainer._say("resuming with changed settings:\n  " + "\n  ".join(changes))
    if trainer.finished:
        trainer._say(f"{checkpoint} is the end of a finished run: all {cfg.train.epochs} epochs trained and "
                     f"evaluated, nothing to do. To train longer, resume with train.epochs=N (N > {cfg.train.epochs})")
        du.cleanup_distributed()
        return {"finished_before": True}
    return trainer.fit()
