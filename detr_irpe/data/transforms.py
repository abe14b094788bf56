"""DETR's augmentations, built from ``torchvision.transforms.v2``.

Every transform takes and returns ``(image, target)`` where ``image`` is a ``tv_tensors.Image``
and ``target["boxes"]`` is a ``tv_tensors.BoundingBoxes``; instance masks, ``target["masks"]``
``(N, H, W)`` as a ``tv_tensors.Mask``, are flipped, resized (nearest) and cropped with the
image; other target entries are carried along (per-box ones, the masks included, are filtered
together with the boxes when a crop removes some).
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Sequence, Tuple

import torch
from torch import Tensor
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from ..config import ConfigError, DataConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class RandomSizeCrop(v2.Transform):
    """Crop a window of random height and width, each uniform in ``[min_size, max_size]``.

    Both bounds are capped by the image side, so images smaller than ``min_size`` are cropped
    to their full extent along that side instead of failing.
    """

    def __init__(self, min_size: int, max_size: int):
        super().__init__()
        if not 0 < min_size <= max_size:
            raise ValueError(f"RandomSizeCrop needs 0 < min_size <= max_size, got {min_size}, {max_size}")
        self.min_size = min_size
        self.max_size = max_size

    def make_params(self, flat_inputs: List[Any]) -> Dict[str, Any]:
        height, width = v2.query_size(flat_inputs)
        h = _randint(min(self.min_size, height), min(self.max_size, height))
        w = _randint(min(self.min_size, width), min(self.max_size, width))
        return dict(top=_randint(0, height - h), left=_randint(0, width - w), height=h, width=w)

    def transform(self, inpt: Any, params: Dict[str, Any]) -> Any:
        return self._call_kernel(F.crop, inpt, **params)


def _randint(low: int, high: int) -> int:
    """Uniform integer in ``[low, high]``, from torch's generator so DataLoader workers differ."""
    return int(torch.randint(low, high + 1, ()))


def per_box_fields(sample: Tuple[Any, dict]) -> Tuple[Tensor, ...]:
    """The target entries that :class:`v2.SanitizeBoundingBoxes` must filter with the boxes."""
    _, target = sample
    return tuple(target[k] for k in ("labels", "area", "iscrowd") if k in target)


def normalize() -> v2.Compose:
    """uint8 image -> float in [0, 1] -> ImageNet mean/std normalised."""
    return v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def make_train_transforms(cfg: "DataConfig") -> v2.Compose:
    """DETR's training augmentation with sizes from ``cfg``.

    Random horizontal flip (``cfg.hflip``), then with equal probability either a multi-scale
    resize (shortest side from ``cfg.train_scales``, longest at most ``cfg.max_size``) or a
    resize to one of ``cfg.crop_resize``, a random crop of side in ``[cfg.crop_min, cfg.crop_max]``
    and the same multi-scale resize; then normalisation. ``cfg.augment=False`` gives the
    evaluation transform; an empty ``cfg.crop_resize`` disables the crop branch.
    """
    if not cfg.augment:
        return make_eval_transforms(cfg)
    multi_scale = v2.RandomShortestSize(list(cfg.train_scales), max_size=cfg.max_size)
    steps: List[Any] = [v2.RandomHorizontalFlip()] if cfg.hflip else []
    if cfg.crop_resize:
        if not 0 < cfg.crop_min <= cfg.crop_max:
            raise ConfigError(f"data.crop_min ({cfg.crop_min}) and data.crop_max ({cfg.crop_max}) must satisfy "
                             f"0 < crop_min <= crop_max")
        crop = v2.Compose([
            v2.RandomShortestSize(list(cfg.crop_resize)),
            RandomSizeCrop(cfg.crop_min, cfg.crop_max),
            v2.SanitizeBoundingBoxes(labels_getter=per_box_fields),  # boxes cropped away
            multi_scale,
        ])
        steps.append(v2.RandomChoice([multi_scale, crop]))
    else:
        steps.append(multi_scale)
    steps.append(normalize())
    return v2.Compose(steps)


def make_eval_transforms(cfg: "DataConfig") -> v2.Compose:
    """Shortest side ``cfg.eval_size``, longest at most ``cfg.max_size``; normalisation."""
    # The training resize with a single scale: same rounding as training, and unlike v2.Resize
    # it accepts max_size <= eval_size (square small-image configs).
    return v2.Compose([v2.RandomShortestSize([cfg.eval_size], max_size=cfg.max_size), normalize()])


def denormalize(image: Tensor, mean: Sequence[float] = IMAGENET_MEAN,
                std: Sequence[float] = IMAGENET_STD) -> Tensor:
    """Undo :func:`normalize` on a ``(..., 3, H, W)`` tensor; returns float in [0, 1] (for drawing)."""
    mean_t = torch.tensor(mean, dtype=image.dtype, device=image.device).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=image.dtype, device=image.device).view(3, 1, 1)
    return (image * std_t + mean_t).clamp(0, 1)


def model_input_transform(data_cfg: DataConfig) -> Callable[[Tensor], Tensor]:
    """The evaluation transform (shortest side ``eval_size``, longest at most ``max_size``), except
    that an image so elongated that it would get a side of 0 pixels gets 1 instead."""
    transform = make_eval_transforms(data_cfg)

    def apply(image: Tensor) -> Tensor:
        h, w = image.shape[-2:]
        scale = min(data_cfg.eval_size / min(h, w), data_cfg.max_size / max(h, w))
        if int(h * scale) >= 1 and int(w * scale) >= 1:
            return transform(image)
        size = [max(1, round(h * scale)), max(1, round(w * scale))]
        return normalize()(F.resize(image, size, antialias=True))

    return apply
