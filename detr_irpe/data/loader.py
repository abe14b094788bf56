"""Batching: pad images to the largest in the batch, and the DataLoader around it."""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import BatchSampler, DataLoader, Dataset

from ..structures import pad_images
from .sampler import ResumableSampler, SeededDataset


def collate_fn(batch: Sequence[Tuple[Tensor, dict]]) -> Tuple[Tensor, Tensor, List[dict]]:
    """``[(image (3, H_i, W_i), target), ...]`` -> ``(images (B, 3, H, W), masks (B, H, W), targets)``.

    Images are zero-padded at the bottom/right to the largest height and width; ``masks`` is
    True on padding. Target boxes stay normalised to each image's own (unpadded) size.
    """
    images, targets = zip(*batch)
    images, masks = pad_images(list(images))
    return images, masks, list(targets)


def build_dataloader(dataset: Dataset, batch_size: int, train: bool, num_workers: int = 0,
                     distributed: Optional[bool] = None, seed: int = 0, pin_memory: bool = False) -> DataLoader:
    """A DataLoader yielding :func:`collate_fn` batches, sharded across processes under DDP.

    Training shuffles and drops the last incomplete batch (as DETR); evaluation keeps order and
    every image. ``distributed`` (default: whether ``torch.distributed`` is initialised) gives
    each process its own shard, like ``DistributedSampler``, so ``batch_size`` is per process;
    shards are evened out by repeating a few images (the evaluator keeps one copy of each).

    The order is a function of ``(seed, epoch)`` and each sample's augmentation is seeded from
    its position (:class:`ResumableSampler`), so batches do not depend on ``num_workers`` and a
    run can resume mid-epoch: call :func:`set_epoch` before iterating.
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
    # A private generator: creating an iterator draws a worker base seed from it, which would
    # otherwise shift the global RNG (dropout) and break exact resume. Samples are seeded by
    # SeededDataset anyway.
    return DataLoader(SeededDataset(dataset), batch_sampler=BatchSampler(sampler, batch_size, drop_last=train),
                      collate_fn=collate_fn, num_workers=num_workers, pin_memory=pin_memory,
                      persistent_workers=num_workers > 0, generator=torch.Generator().manual_seed(seed))



def set_epoch(loader: DataLoader, epoch: int, start: int = 0) -> None:
    """Select ``epoch``'s order for a :func:`build_dataloader` loader, skipping its first ``start`` samples."""
    loader.batch_sampler.sampler.set_epoch(epoch, start=start)
