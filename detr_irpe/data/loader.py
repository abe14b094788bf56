"""Batching: pad images to the largest in the batch, and the DataLoader around it."""
from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.connection
import os
import re
import signal
import threading
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import BatchSampler, DataLoader, Dataset, get_worker_info

from ..errors import DetrIrpeError
from ..structures import pad_images
from .errors import DataLoaderWorkerError
from .sampler import ResumableSampler, SeededDataset

_DEAD_WORKER = re.compile(r"DataLoader worker \(pid(?:\(s\))? ([\d, ]+)\)")
IDLE = -1


def collate_fn(batch: Sequence[Tuple[Tensor, dict]]) -> Tuple[Tensor, Tensor, List[dict]]:
    """``[(image (3, H_i, W_i), target), ...]`` -> ``(images (B, 3, H, W), masks (B, H, W), targets)``.

    Images are zero-padded at the bottom/right to the largest height and width; ``masks`` is
    True on padding. Target boxes stay normalised to each image's own (unpadded) size.
    """
    images, targets = zip(*batch)
    images, masks = pad_images(list(images))
    return images, masks, list(targets)


class WorkerItems:
    """Which item each DataLoader worker is loading, in shared memory.

    A worker killed by a signal (out of memory, a segfault in an image library) cannot report
    anything itself; this lets the main process name the item it was on. Create it before the
    workers start (they inherit it); workers write ``(pid, index)`` into slot ``worker id``.
    """

    def __init__(self, num_workers: int):
        self._slots = multiprocessing.Array("q", [IDLE] * (2 * num_workers), lock=False)

    def begin(self, index) -> None:
        info = get_worker_info()
        if info is not None:
            self._slots[2 * info.id] = os.getpid()
            self._slots[2 * info.id + 1] = int(index) if isinstance(index, int) else IDLE

    def end(self) -> None:
        info = get_worker_info()
        if info is not None:
            self._slots[2 * info.id + 1] = IDLE

    def loading(self) -> Dict[int, Tuple[int, int]]:
        """``{worker id: (pid, index being loaded or -1)}`` for workers that have loaded something."""
        slots = list(self._slots)
        return {w: (slots[2 * w], slots[2 * w + 1]) for w in range(len(slots) // 2) if slots[2 * w] != IDLE}


def _dead_workers(iterator, wait: float = 0.0) -> Dict[int, int]:
    """``{pid: exit code}`` of the workers of a PyTorch DataLoader iterator that have died (exit code
    != 0; ``-N`` is signal N), waiting up to ``wait`` seconds for one to finish exiting."""
    workers = list(getattr(iterator, "_workers", ()))
    if wait > 0 and workers:
        ending = multiprocessing.connection.wait([w.sentinel for w in workers], timeout=wait)
        for w in workers:
            if w.sentinel in ending:  # its files are closed; a moment later it can be reaped
                w.join(timeout=wait)
    return {w.pid: w.exitcode for w in workers if w.exitcode not in (None, 0)}


def _cause_of_type(error: BaseException, kind: type) -> Optional[BaseException]:
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, kind):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def _how(exit_code: Optional[int]) -> str:
    if exit_code is None:
        return "died"
    if exit_code < 0:
        try:
            return f"was killed by {signal.Signals(-exit_code).name}"
        except ValueError:
            return f"was killed by signal {-exit_code}"
    return f"exited with code {exit_code}"


def without_worker_traceback(error: DetrIrpeError) -> DetrIrpeError:
    """``error`` as the worker raised it: PyTorch re-raises an exception of a DataLoader worker in
    the main process as ``type(error)("Caught X in DataLoader worker process N. Original Traceback
    ...: <message>")``; a documented error's message is meant to be read alone."""
    text = str(error)
    if not text.startswith("Caught ") or "Original Traceback" not in text:
        return error
    kind = type(error)
    marker = f"{kind.__module__}.{kind.__qualname__}: "
    at = text.rfind(marker)
    return kind(text[at + len(marker):].rstrip()) if at >= 0 else error


class ReportingDataLoader(DataLoader):
    """A ``DataLoader`` whose dead-worker errors name the items the dead workers were loading.

    PyTorch reports a worker killed by a signal as ``RuntimeError: DataLoader worker (pid N) is
    killed by signal: Killed``, raised while fetching a batch or, from its SIGCHLD handler, at
    whatever line the main process is running (the training step). Both become a
    :class:`DataLoaderWorkerError` naming the item, image id and file.
    """

    def __iter__(self) -> Iterator:
        batches = super().__iter__()  # starts the workers and PyTorch's SIGCHLD handler
        items: Optional[WorkerItems] = getattr(self.dataset, "tracker", None)
        if self.num_workers == 0 or items is None:
            yield from batches
            return
        with self._explaining_signals():
            while True:
                try:
                    batch = next(batches)
                except StopIteration:
                    return
                except DetrIrpeError as e:  # raised in a worker: PyTorch prefixes the worker's traceback
                    raise without_worker_traceback(e) from None
                except Exception as e:
                    earlier = _cause_of_type(e, DataLoaderWorkerError)  # raised by the handler below
                    if earlier is not None:
                        raise earlier from earlier.__cause__
                    # a batch sent by a worker that died since fails with ConnectionResetError: the
                    # worker's sockets close a moment before it can be seen dead, so wait that moment
                    wait = 1.0 if isinstance(e, (OSError, EOFError)) else 0.0
                    better = self.explain_worker_death(e, _dead_workers(batches, wait))
                    if better is None:
                        raise
                    raise better from e
                yield batch

    def explain_worker_death(self, error: BaseException, dead: Optional[Dict[int, int]] = None
                             ) -> Optional[DataLoaderWorkerError]:
        """A :class:`DataLoaderWorkerError` for ``error`` if PyTorch's message names dead workers or
        ``dead`` (``{pid: exit code}``) lists some; else None (the error is not about a dead worker)."""
        dead = dict(dead or {})
        match = _DEAD_WORKER.search(str(error))
        if match is not None:
            dead.update({int(p): dead.get(int(p)) for p in match.group(1).replace(",", " ").split()})
        items: Optional[WorkerItems] = getattr(self.dataset, "tracker", None)
        if not dead or items is None:
            return None
        describe = getattr(self.dataset, "describe_item", lambda i: f"item {i}")
        lines = []
        for worker, (pid, index) in sorted(items.loading().items()):
            if pid in dead:
                what = f"while loading {describe(index)}" if index != IDLE else \
                    "between items (collating or sending a batch)"
                lines.append(f"worker {worker} (pid {pid}) {_how(dead[pid])} {what}")
        if not lines:
            lines = [f"worker (pid {pid}) {_how(code)} before loading any item" for pid, code in sorted(dead.items())]
        cause = f"{type(error).__name__}: {str(error).strip().rstrip('. ')}"
        return DataLoaderWorkerError(
            f"DataLoader {'; '.join(lines)} ({cause}). A worker killed by a signal has usually run out of "
            f"memory (lower data.num_workers or train.batch_size) or crashed in native code on that item: "
            f"check the dataset with tools/check_data.py, or load the item with data.num_workers=0 to see "
            f"a Python traceback.")

    @contextlib.contextmanager
    def _explaining_signals(self):
        """While iterating, an error raised by PyTorch's SIGCHLD handler names the dead worker's item too."""
        sigchld = getattr(signal, "SIGCHLD", None)  # not on Windows
        previous = signal.getsignal(sigchld) if sigchld is not None else None
        if not callable(previous) or threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum, frame):
            try:
                previous(signum, frame)
            except RuntimeError as e:
                better = self.explain_worker_death(e)
                if better is None:
                    raise
                raise better from e

        signal.signal(sigchld, handler)
        try:
            yield
        finally:
            if signal.getsignal(sigchld) is handler:
                signal.signal(sigchld, previous)


def build_dataloader(dataset: Dataset, batch_size: int, train: bool, num_workers: int = 0,
                     distributed: Optional[bool] = None, seed: int = 0, pin_memory: bool = False) -> DataLoader:
    """A DataLoader yielding :func:`collate_fn` batches, sharded across processes under DDP.

    Training shuffles and drops the last incomplete batch (as DETR); evaluation keeps order and
    every image. ``distributed`` (default: whether ``torch.distributed`` is initialised) gives
    each process its own shard, like ``DistributedSampler``, so ``batch_size`` is per process;
    shards are evened out by repeating a few images (the evaluator keeps one copy of each).

    The order is a function of ``(seed, epoch)`` and each sample's augmentation is seeded from
    its position (:class:`ResumableSampler`), so batches do not depend on ``num_workers`` and a
    run can resume mid-epoch: call :func:`set_epoch` before iterating. A worker that dies
    (killed by a signal) is reported with the item it was loading (:class:`ReportingDataLoader`).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if distributed is None:
        distributed = dist.is_available() and dist.is_initialized()
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    sampler = ResumableSampler(len(dataset), shuffle=train, seed=seed, rank=rank, world_size=world_size)
    if train and len(sampler) < batch_size:
        raise ValueError(
            f"the training set has {len(sampler)} image(s) per process, fewer than batch_size={batch_size}: "
            f"with drop_last there would be no batch at all. Lower train.batch_size or add images.")
    tracker = WorkerItems(num_workers) if num_workers > 0 else None  # before the workers start
    # A private generator: creating an iterator draws a worker base seed from it, which would
    # otherwise shift the global RNG (dropout) and break exact resume. Samples are seeded by
    # SeededDataset anyway.
    return ReportingDataLoader(SeededDataset(dataset, tracker),
                               batch_sampler=BatchSampler(sampler, batch_size, drop_last=train),
                               collate_fn=collate_fn, num_workers=num_workers, pin_memory=pin_memory,
                               persistent_workers=num_workers > 0, generator=torch.Generator().manual_seed(seed))



def set_epoch(loader: DataLoader, epoch: int, start: int = 0) -> None:
    """Select ``epoch``'s order for a :func:`build_dataloader` loader, skipping its first ``start`` samples."""
    loader.batch_sampler.sampler.set_epoch(epoch, start=start)
