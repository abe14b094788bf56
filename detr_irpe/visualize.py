"""Pictures: predicted and ground-truth boxes on images (more views live beside this in later modules)."""
from __future__ import annotations

import colorsys
from typing import Dict, Optional, Sequence

import torch
from torch import Tensor
from torchvision.utils import draw_bounding_boxes


def class_color(label: int) -> tuple:
    """A stable, distinct RGB colour per class id (golden-ratio hue steps)."""
    hue = (label * 0.618033988749895) % 1.0
    r, g, b = colorsys.hsv_to_rgb(hue, 0.85, 1.0)
    return int(r * 255), int(g * 255), int(b * 255)


def draw_detections(image: Tensor, boxes: Tensor, labels: Tensor, scores: Optional[Tensor] = None,
                    names: Optional[Dict[int, str]] = None, width: int = 2) -> Tensor:
    """Boxes with class names (and scores) drawn on an image.

    Args:
        image: ``(3, H, W)`` uint8.
        boxes: ``(N, 4)`` absolute ``(x1, y1, x2, y2)`` in the image's pixels.
        labels: ``(N,)`` class ids; ``names`` maps them to text.
        scores: ``(N,)`` in [0, 1], shown next to the name when given.
    Returns:
        ``(3, H, W)`` uint8.
    """
    names = names or {}
    if len(boxes) == 0:
        return image.clone()
    texts = []
    for i, label in enumerate(labels.tolist()):
        text = names.get(int(label), str(int(label)))
        if scores is not None:
            text += f" {float(scores[i]):.2f}"
        texts.append(text)
    colors = [class_color(int(l)) for l in labels.tolist()]
    font_size = max(10, min(image.shape[-2:]) // 40)
    try:
        return draw_bounding_boxes(image, boxes.float(), labels=texts, colors=colors, width=width,
                                   font="DejaVuSans.ttf", font_size=font_size)
    except (OSError, ValueError):  # no TrueType font on this machine: torchvision's default font
        return draw_bounding_boxes(image, boxes.float(), labels=texts, colors=colors, width=width)


def side_by_side(images: Sequence[Tensor], gap: int = 8) -> Tensor:
    """Concatenate ``(3, H_i, W_i)`` uint8 images left to right on a white canvas."""
    h = max(im.shape[1] for im in images)
    w = sum(im.shape[2] for im in images) + gap * (len(images) - 1)
    canvas = torch.full((3, h, w), 255, dtype=torch.uint8)
    x = 0
    for im in images:
        canvas[:, : im.shape[1], x: x + im.shape[2]] = im
        x += im.shape[2] + gap
    return canvas
