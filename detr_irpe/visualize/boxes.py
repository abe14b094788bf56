"""Boxes with class names and scores (and instance masks) on images; panels side by side, with titles."""
from __future__ import annotations

import colorsys
from pathlib import Path
from typing import Dict, Optional, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

from ..files import atomic_write

TITLE_HEIGHT = 24  # pixels of the title strip above each panel
MASK_ALPHA = 0.5  # opacity of a mask's class colour over the image


def class_color(label: int) -> tuple:
    """A stable, distinct RGB colour per class id (golden-ratio hue steps)."""
    hue = (label * 0.618033988749895) % 1.0
    r, g, b = colorsys.hsv_to_rgb(hue, 0.85, 1.0)
    return int(r * 255), int(g * 255), int(b * 255)


def draw_detections(image: Tensor, boxes: Tensor, labels: Tensor, scores: Optional[Tensor] = None,
                    names: Optional[Dict[int, str]] = None, width: int = 2, masks: Optional[Tensor] = None,
                    mask_alpha: float = MASK_ALPHA) -> Tensor:
    """Boxes with class names (and scores) drawn on an image, over the instance masks when given.

    Args:
        image: ``(3, H, W)`` uint8.
        boxes: ``(N, 4)`` absolute ``(x1, y1, x2, y2)`` in the image's pixels.
        labels: ``(N,)`` class ids; ``names`` maps them to text.
        scores: ``(N,)`` in [0, 1], shown next to the name when given.
        masks: ``(N, H, W)`` bool, each filled in its box's class colour at opacity ``mask_alpha``
            (``torchvision.utils.draw_segmentation_masks``), under the boxes.
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
    if masks is not None:
        if masks.shape != (len(boxes), *image.shape[-2:]):
            raise ValueError(f"masks must be (N, H, W) = ({len(boxes)}, {image.shape[-2]}, {image.shape[-1]}), "
                             f"got {tuple(masks.shape)}")
        image = draw_segmentation_masks(image, masks.bool().cpu(), alpha=mask_alpha, colors=colors)
    font_size = max(10, min(image.shape[-2:]) // 32)
    # black text on a label box of the class colour (``fill_labels``, torchvision >= 0.20)
    filled = {"fill_labels": True}
    for kwargs in ({**filled, "font": "DejaVuSans.ttf", "font_size": font_size}, filled,
                   {"font": "DejaVuSans.ttf", "font_size": font_size}, {}):
        try:
            return draw_bounding_boxes(image, boxes.float(), labels=texts, colors=colors, width=width, **kwargs)
        except TypeError:  # an older torchvision without fill_labels
            continue
        except (OSError, ValueError):  # no TrueType font on this machine: torchvision's default font
            continue
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


def save_png(image: Tensor, path) -> Path:
    """Write a ``(3, H, W)`` uint8 image as a PNG file, atomically (creating its folder)."""
    picture = Image.fromarray(image.permute(1, 2, 0).contiguous().cpu().numpy())
    return atomic_write(path, lambda f: picture.save(f, format="PNG"))


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.truetype("DejaVuSans.ttf", size)
    except OSError:
        try:
            return ImageFont.load_default(size)  # Pillow >= 10.1
        except TypeError:
            return ImageFont.load_default()


def draw_text(image: Tensor, text: str, xy=(4, 4), size: int = 14, color=(255, 255, 255),
              background=(0, 0, 0)) -> Tensor:
    """``text`` written on a copy of a ``(3, H, W)`` uint8 image at ``xy`` on a filled box."""
    pil = Image.fromarray(image.permute(1, 2, 0).contiguous().numpy())
    draw = ImageDraw.Draw(pil)
    font = _font(size)
    left, top, right, bottom = draw.textbbox(xy, text, font=font)
    if background is not None:
        draw.rectangle((left - 2, top - 2, right + 2, bottom + 2), fill=background)
    draw.text(xy, text, fill=color, font=font)
    return torch.from_numpy(np.array(pil)).permute(2, 0, 1).contiguous()


def _fit(draw: ImageDraw.ImageDraw, text: str, width: int, size: int, min_size: int = 8):
    """The largest font (down to ``min_size``) at which ``text`` fits ``width`` pixels, and the text
    (shortened with an ellipsis when even ``min_size`` is too wide)."""
    for s in range(size, min_size - 1, -1):
        font = _font(s)
        if draw.textlength(text, font=font) <= width:
            return font, text
    while len(text) > 1 and draw.textlength(text + "\u2026", font=font) > width:
        text = text[:-1]
    return font, text + "\u2026"


def with_title(image: Tensor, title: str, height: int = TITLE_HEIGHT) -> Tensor:
    """A white strip of ``height`` pixels holding ``title`` above a ``(3, H, W)`` uint8 image.

    The font shrinks (and the title is shortened) to fit the image's width.
    """
    pil = Image.new("RGB", (int(image.shape[2]), height), (255, 255, 255))
    draw = ImageDraw.Draw(pil)
    font, text = _fit(draw, title, int(image.shape[2]) - 6, max(8, height - 10))
    try:
        draw.text((3, height // 2), text, fill=(0, 0, 0), font=font, anchor="lm")
    except ValueError:  # a bitmap font has no anchors
        draw.text((3, 2), text, fill=(0, 0, 0), font=font)
    strip = torch.from_numpy(np.array(pil)).permute(2, 0, 1)
    return torch.cat([strip, image], dim=1)


def titled_row(panels: Sequence[Tensor], titles: Sequence[str], gap: int = 8,
               title_height: int = TITLE_HEIGHT) -> Tensor:
    """Panels side by side, each with its title above: ``(3, title_height + max H, sum W + gaps)``."""
    if len(panels) != len(titles):
        raise ValueError(f"got {len(panels)} panels but {len(titles)} titles")
    return side_by_side([with_title(p, t, title_height) for p, t in zip(panels, titles)], gap=gap)


def prediction_vs_ground_truth(image: Tensor, prediction: Dict[str, Tensor], ground_truth: Optional[Dict[str, Tensor]],
                               names: Optional[Dict[int, str]] = None, gap: int = 8,
                               title_height: int = TITLE_HEIGHT) -> Tensor:
    """The "prediction" and "ground truth" panels of one image, side by side.

    Args:
        image: ``(3, H, W)`` uint8.
        prediction: ``boxes`` ``(N, 4)`` absolute xyxy, ``labels`` ``(N,)``, ``scores`` ``(N,)``, and
            optionally ``masks`` ``(N, H, W)`` bool (drawn under the boxes).
        ground_truth: ``boxes`` and ``labels`` (and ``masks``) like ``prediction``; None draws the
            prediction only.
        names: class id -> name.
    Returns:
        ``(3, title_height + H, 2 W + gap)`` uint8 (``(3, title_height + H, W)`` without ground truth).
    """
    pred = draw_detections(image, prediction["boxes"], prediction["labels"], prediction.get("scores"), names,
                           masks=prediction.get("masks"))
    n = len(prediction["boxes"])
    panels, titles = [pred], [f"prediction ({n} box{'es' if n != 1 else ''})"]
    if ground_truth is not None:
        panels.append(draw_detections(image, ground_truth["boxes"], ground_truth["labels"], None, names,
                                      masks=ground_truth.get("masks")))
        m = len(ground_truth["boxes"])
        titles.append(f"ground truth ({m} box{'es' if m != 1 else ''})")
    return titled_row(panels, titles, gap=gap, title_height=title_height)
