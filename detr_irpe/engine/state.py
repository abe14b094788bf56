"""Saving training state: atomic writes, rolling and best checkpoints, RNG states for exact resume."""
from __future__ import annotations

import random
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..files import atomic_write
from ..interop import save_safetensors


def atomic_save(obj, path) -> None:
    """``torch.save`` to a temporary file in the same folder, then rename over ``path``
    (:func:`detr_irpe.files.atomic_write`: the umask's permissions; a full disk or a crash while
    writing leaves the previous file at ``path`` intact and raises ``OutputError`` naming it)."""
    atomic_write(path, lambda f: torch.save(obj, f))


def capture_rng() -> dict:
    """RNG states of torch (CPU and CUDA), numpy and Python, as tensors/plain types (weights_only-safe)."""
    state = {
        "torch": torch.get_rng_state(),
        "numpy": _numpy_state_to_plain(np.random.get_state()),
        "python": _python_state_to_plain(random.getstate()),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: Optional[dict]) -> None:
    if not state:
        return
    torch.set_rng_state(state["torch"])
    np.random.set_state(_plain_to_numpy_state(state["numpy"]))
    random.setstate(_plain_to_python_state(state["python"]))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def _numpy_state_to_plain(st):
    name, keys, pos, has_gauss, gauss = st
    return {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "gauss": float(gauss)}


def _plain_to_numpy_state(d):
    return (d["name"], d["keys"].numpy().astype(np.uint32), d["pos"], d["has_gauss"], d["gauss"])


def _python_state_to_plain(st):
    version, internal, gauss = st
    return {"version": version, "internal": torch.tensor(internal, dtype=torch.int64), "gauss": gauss}


def _plain_to_python_state(d):
    return (d["version"], tuple(int(x) for x in d["internal"].tolist()), d["gauss"])


class CheckpointKeeper:
    """Writes ``checkpoint.pth`` (latest), ``checkpoint_epochNNNN.pth`` (the last ``keep_last``) and
    ``checkpoint_best.pth`` (highest AP) into ``output_dir``; with ``safetensors``, also the model's
    weights (with the config and class names) as a ``.safetensors`` file beside each.

    ``checkpoint_epochNNNN.pth`` is named after the epoch it ends as the log counts it:
    ``checkpoint_epoch0033.pth`` holds the end of the epoch logged as ``"epoch": 33`` (0-based), and
    its own ``epoch`` field, the number of finished epochs, is 34."""

    def __init__(self, output_dir, keep_last: int = 3, safetensors: bool = False):
        self.output_dir = Path(output_dir)
        self.keep_last = keep_last
        self.safetensors = safetensors

    @property
    def latest(self) -> Path:
        return self.output_dir / "checkpoint.pth"

    @property
    def best(self) -> Path:
        return self.output_dir / "checkpoint_best.pth"

    def save(self, state: dict, epoch_end: bool = False, is_best: bool = False) -> Path:
        self._write(state, self.latest)
        if epoch_end and self.keep_last > 0:
            self._write(state, self.output_dir / f"checkpoint_epoch{state['epoch'] - 1:04d}.pth")
            numbered = [p for p in self.output_dir.glob("checkpoint_epoch*.pth") if self._epoch_of(p) is not None]
            rolling = sorted(numbered, key=self._epoch_of)
            for old in rolling[: max(len(rolling) - self.keep_last, 0)]:
                old.unlink(missing_ok=True)
                old.with_suffix(".safetensors").unlink(missing_ok=True)
        if is_best:
            self._write(state, self.best)
        return self.latest

    @staticmethod
    def _epoch_of(path: Path) -> Optional[int]:
        """The epoch number of a ``checkpoint_epochNNNN.pth`` name (epoch 10000 after 9999), None
        for another name (a file of the user's, never removed)."""
        digits = path.stem[len("checkpoint_epoch"):]
        return int(digits) if digits.isdigit() else None

    def _write(self, state: dict, path: Path) -> None:
        atomic_save(state, path)
        if self.safetensors:
            save_safetensors(path.with_suffix(".safetensors"), state["model"], state.get("config"),
                             state.get("categories"))
