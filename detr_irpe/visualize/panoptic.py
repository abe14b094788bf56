"""A panoptic segmentation drawn over its image, with a legend of the segments' classes."""
from __future__ import annotations

from typing import Dict, Mapping, Optional, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import Tensor

from .boxes import _font, class_color

PANOPTIC_ALPHA = 0.6  # opacity of the segment colours over the image
LEGEND_ROW = 18  # pixels per legend entry


def segment_colors(segments_info: Sequence[Mapping]) -> Dict[int, tuple]:
    """Segment id -> RGB: its class colour, things of one class told apart by brightness."""
    colors, seen = {}, {}
    for segment in segments_info:
        category = int(segment["category_id"])
        base = np.array(class_color(category), dtype=np.float64)
        if segment.get("isthing", True):
            k = seen.get(category, 0)
            seen[category] = k + 1
            base = base * (1.0 - 0.18 * (k % 4))  # the n-th instance a little darker
        colors[int(segment["id"])] = tuple(int(v) for v in base)
    return colors


def draw_panoptic(image: Tensor, ids: Tensor, segments_info: Sequence[Mapping],
                  names: Optional[Mapping[int, str]] = None, alpha: float = PANOPTIC_ALPHA,
                  legend: bool = True) -> Tensor:
    """The panoptic map over ``image``: each segment filled with its colour (:func:`segment_colors`),
    segment borders in white, pixels of no listed segment left as they are; with ``legend``, a
    white strip on the right names each class present (``thing`` / ``stuff``, instance count).

    Args:
        image: ``(3, H, W)`` uint8 RGB.
        ids: ``(H, W)`` integer segment ids (as in a COCO panoptic PNG).
        segments_info: the segments (``id``, ``category_id``, ``isthing``).
        names: category id -> name (the id is written where missing).

    Returns:
        ``(3, H', W + legend width)`` uint8, ``H'`` the larger of ``H`` and the legend's height
        (white below the image when the legend is taller).
    """
    ids = torch.as_tensor(ids).cpu().numpy().astype(np.int64)
    if ids.shape != tuple(image.shape[-2:]):
        raise ValueError(f"ids are {ids.shape}, the image {tuple(image.shape[-2:])}: they must be the same size")
    picture = image.permute(1, 2, 0).cpu().numpy().astype(np.float64)
    colors = segment_colors(segments_info)
    for segment_id, color in colors.items():
        where = ids == segment_id
        picture[where] = (1 - alpha) * picture[where] + alpha * np.array(color)
    border = np.zeros_like(ids, dtype=bool)
    border[:, 1:] |= ids[:, 1:] != ids[:, :-1]
    border[1:, :] |= ids[1:, :] != ids[:-1, :]
    picture[border] = 255
    drawn = picture.clip(0, 255).astype(np.uint8)
    if legend:
        strip = _legend(segments_info, names or {})
        rows = max(drawn.shape[0], strip.shape[0])
        pad = lambda a: np.pad(a, ((0, rows - a.shape[0]), (0, 0), (0, 0)), constant_values=255)  # noqa: E731
        drawn = np.concatenate([pad(drawn), pad(strip)], axis=1)
    return torch.from_numpy(drawn).permute(2, 0, 1).contiguous()


def _legend(segments_info: Sequence[Mapping], names: Mapping[int, str]) -> np.ndarray:
    """A white ``(rows, width, 3)`` uint8 strip naming each class present, one row per class."""
    entries: Dict[int, list] = {}
    for segment in segments_info:
        entries.setdefault(int(segment["category_id"]), []).append(segment)
    font = _font(12)
    lines = []
    for category, segments in sorted(entries.items()):
        kind = "thing" if segments[0].get("isthing", True) else "stuff"
        count = f" x{len(segments)}" if len(segments) > 1 else ""
        lines.append((class_color(category), f"{names.get(category, str(category))} ({kind}){count}"))
    if not lines:
        lines.append(((255, 255, 255), "no segment"))
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    width = 24 + max(int(measure.textlength(text, font=font)) for _, text in lines) + 8
    strip = Image.new("RGB", (width, LEGEND_ROW * len(lines) + 4), (255, 255, 255))
    draw = ImageDraw.Draw(strip)
    for row, (color, text) in enumerate(lines):
        top = 4 + row * LEGEND_ROW
        draw.rectangle((6, top + 2, 18, top + 14), fill=color, outline=(0, 0, 0))
        draw.text((24, top), text, fill=(0, 0, 0), font=font)
    return np.asarray(strip)
