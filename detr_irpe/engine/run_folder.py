"""The folder of a training run: what marks it as taken, who may write into it, and its log.

A new run never writes into a folder that holds another run's checkpoints or log: it would
replace them. ``--resume`` continues a run in its own folder (or in an empty one).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

from ..files import OutputExistsError, atomic_write_text, check_writable, fresh_folder, same_file
from .logger import read_jsonl

# files whose presence means "a run lives here"
RUN_MARKERS = ("checkpoint.pth", "checkpoint_best.pth", "log.jsonl", "metrics.json", "detections.json")


class RunFolderInUseError(OutputExistsError):
    """train.output_dir holds another run, which a new run would replace."""


def run_files(folder: Path) -> List[Path]:
    """The files of ``folder`` that belong to a training run (sorted)."""
    if not folder.is_dir():
        return []
    found = {folder / name for name in RUN_MARKERS if (folder / name).exists()}
    found.update(folder.glob("checkpoint_epoch*.pth"))
    return sorted(found)


def prepare_run_folder(folder: Path, resume: Optional[Path] = None) -> Path:
    """Check that a run may write into ``folder`` and create it.

    A new run (``resume=None``) needs a folder without run files; a resumed run may write into the
    folder of the checkpoint it resumes from, or into one without run files.

    Raises:
        RunFolderInUseError: naming the run files found and the ways on (``--resume``, a new folder).
        OutputExistsError / OutputError: ``folder`` is a file, or cannot be written.
    """
    folder = Path(folder)
    taken = run_files(folder)
    own = resume is not None and same_file(Path(resume).parent, folder)
    if taken and not own:
        names = ", ".join(p.name for p in taken[:4]) + (", ..." if len(taken) > 4 else "")
        what = f"train.output_dir {folder} already holds a training run ({names})"
        if resume is None:
            raise RunFolderInUseError(
                f"{what}, which a new run would replace. Continue that run with --resume {folder / 'checkpoint.pth'}, "
                f"or train into a new folder, e.g. train.output_dir={fresh_folder(folder)}")
        raise RunFolderInUseError(
            f"{what}, not the one of {resume}. Resume into the checkpoint's own folder (leave train.output_dir "
            f"out) or into an empty one")
    return check_writable(folder, "train.output_dir")


def logged_epochs(log_path: Path) -> List[int]:
    """The epochs recorded in a ``log.jsonl`` (none if it does not exist)."""
    return [r["epoch"] for r in read_jsonl(log_path) if isinstance(r.get("epoch"), int)] if log_path.is_file() else []


def set_aside_later_records(log_path: Path, epoch: int) -> Optional[Path]:
    """Move the records of epochs ``>= epoch`` from ``log_path`` to ``log_superseded.jsonl`` beside it
    (resuming from an earlier checkpoint replaces those epochs); returns that file if any moved."""
    if not log_path.is_file():
        return None
    records = read_jsonl(log_path)
    later = [r for r in records if isinstance(r.get("epoch"), int) and r["epoch"] >= epoch]
    if not later:
        return None
    aside = log_path.with_name("log_superseded.jsonl")
    previous = aside.read_text() if aside.is_file() else ""
    atomic_write_text(aside, previous + "".join(json.dumps(r, default=float) + "\n" for r in later))
    atomic_write_text(log_path, "".join(json.dumps(r, default=float) + "\n" for r in records if r not in later))
    return aside
