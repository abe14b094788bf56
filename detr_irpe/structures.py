"""Batching images of different sizes: pad to the largest and keep a mask of the padding."""
from __future__ import annotations

from typing import Sequence, Tuple

import torch
from torch import Tensor


def pad_images(images: Sequence[Tensor], size_divisibility: int = 1) -> Tuple[Tensor, Tensor]:
    """Pad a list of ``(C, H_i, W_i)`` images at the bottom/right to a common size.

    Returns:
        batch: ``(B, C, H, W)`` with zeros in the padded area, ``H = max H_i`` and
            ``W = max W_i`` rounded up to ``size_divisibility``.
        mask: ``(B, H, W)`` bool, True on padding (DETR's convention).
    """
    if len(images) == 0:
        raise ValueError("pad_images needs at least one image")
    channels = {img.shape[0] for img in images}
    if any(img.dim() != 3 for img in images) or len(channels) != 1:
        shapes = [tuple(img.shape) for img in images]
        raise ValueError(f"pad_images expects (C, H, W) images with the same C, got shapes {shapes}")
    h = max(img.shape[1] for img in images)
    w = max(img.shape[2] for img in images)
    if size_divisibility > 1:
        h = (h + size_divisibility - 1) // size_divisibility * size_divisibility
        w = (w + size_divisibility - 1) // size_divisibility * size_divisibility
    first = images[0]
    batch = first.new_zeros((len(images), first.shape[0], h, w))
    mask = torch.ones((len(images), h, w), dtype=torch.bool, device=first.device)
    for img, out, m in zip(images, batch, mask):
        out[:, : img.shape[1], : img.shape[2]].copy_(img)
        m[: img.shape[1], : img.shape[2]] = False
    return batch, mask
