"""Attention maps on the image: the encoder self-attention of one pixel and the decoder
cross-attention of each detected object's query.

An attention row covers the encoder's ``fh x fw`` feature grid, which spans the padded input
tensor; it is upsampled to the padded input size, cropped to the image's valid region,
resized to the original image and alpha-blended onto it as a heatmap.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch import Tensor

from ..errors import UsageError

from .boxes import TITLE_HEIGHT, draw_detections, side_by_side, with_title
from .forward import ForwardResult

Size = Tuple[int, int]
MAX_WIDTH = 2000  # pixels: a wider picture of panels wraps them into rows


def pixel_to_cell(xy: Sequence[float], image_hw: Size, input_hw: Size, padded_hw: Size, feature_hw: Size) -> Tuple[int, int]:
    """The feature cell ``(row, col)`` holding image pixel ``xy = (x, y)`` of the original image.

    The image is resized to ``input_hw`` and padded to ``padded_hw``; the ``feature_hw`` grid
    covers the padded tensor uniformly. Raises ``ValueError`` for a pixel outside the image.
    """
    x, y = float(xy[0]), float(xy[1])
    H, W = image_hw
    if not (0 <= x < W and 0 <= y < H):
        raise UsageError(f"pixel (x={xy[0]}, y={xy[1]}) is outside the image, which is {W}x{H} "
                         f"(x in [0, {W}), y in [0, {H}))")
    (h, w), (hp, wp), (fh, fw) = input_hw, padded_hw, feature_hw
    y_in, x_in = (y + 0.5) * h / H, (x + 0.5) * w / W  # pixel centre in the resized image
    row = min(int(y_in * fh / hp), fh - 1)
    col = min(int(x_in * fw / wp), fw - 1)
    return row, col


def valid_cells(input_hw: Size, padded_hw: Size, feature_hw: Size) -> Size:
    """Rows and columns of the feature grid that hold image (not padding), as the model's mask does."""
    mask = torch.ones(1, 1, *padded_hw)
    mask[..., : input_hw[0], : input_hw[1]] = 0
    small = F.interpolate(mask, size=feature_hw)[0, 0] < 0.5  # nearest, like models.backbone.mask_to_feature
    return int(small.any(1).sum()), int(small.any(0).sum())


def attention_to_image(weights: Tensor, feature_hw: Size, input_hw: Size, padded_hw: Size, image_hw: Size,
                       interpolation: str = "bilinear") -> Tensor:
    """One attention row over the feature grid as a heatmap of the original image.

    Args:
        weights: ``(fh * fw,)`` attention over the (padded) feature grid, row-major.
        interpolation: ``bilinear`` (smooth) or ``nearest`` (one flat block per feature cell).
    Returns:
        ``(H, W)`` float in [0, 1] (min-max scaled over the image's valid region).
    """
    fh, fw = feature_hw
    if weights.numel() != fh * fw:
        raise ValueError(f"attention row has {weights.numel()} entries, the feature grid is {fh}x{fw}")
    grid = weights.float().reshape(1, 1, fh, fw)
    kwargs = {"align_corners": False} if interpolation == "bilinear" else {}
    full = F.interpolate(grid, size=tuple(padded_hw), mode=interpolation, **kwargs)
    crop = full[..., : input_hw[0], : input_hw[1]]  # drop the padding
    heat = F.interpolate(crop, size=tuple(image_hw), mode=interpolation, **kwargs)[0, 0]
    lo, hi = heat.min(), heat.max()
    return (heat - lo) / (hi - lo) if hi > lo else torch.zeros_like(heat)


def overlay_heatmap(image: Tensor, heat: Tensor, alpha: float = 0.5, cmap: str = "jet") -> Tensor:
    """Blend a matplotlib colormap of ``heat`` (``(H, W)`` in [0, 1]) onto a ``(3, H, W)`` uint8 image."""
    import matplotlib

    if heat.shape != image.shape[1:]:
        raise ValueError(f"heatmap {tuple(heat.shape)} and image {tuple(image.shape[1:])} differ in size")
    colors = matplotlib.colormaps[cmap](heat.clamp(0, 1).numpy())[..., :3]  # (H, W, 3) in [0, 1]
    colors = torch.from_numpy(colors).permute(2, 0, 1).float() * 255
    out = (1 - alpha) * image.float() + alpha * colors
    return out.round().clamp(0, 255).to(torch.uint8)


def draw_cross(image: Tensor, xy: Sequence[float], size: Optional[int] = None, color=(255, 255, 255)) -> Tensor:
    """An ``x`` marker (black outline) centred on pixel ``xy = (x, y)`` of a ``(3, H, W)`` uint8 image."""
    pil = Image.fromarray(image.permute(1, 2, 0).contiguous().numpy())
    draw = ImageDraw.Draw(pil)
    size = size or max(5, min(image.shape[1:]) // 25)
    x, y = float(xy[0]), float(xy[1])
    width = max(2, size // 3)
    for fill, w in (((0, 0, 0), width + 2), (color, width)):
        draw.line((x - size, y - size, x + size, y + size), fill=fill, width=w)
        draw.line((x - size, y + size, x + size, y - size), fill=fill, width=w)
    return torch.from_numpy(np.array(pil)).permute(2, 0, 1).contiguous()


def _layer(maps: List[Tensor], layer: int, what: str) -> Tuple[int, Tensor]:
    if not maps:
        raise ValueError(f"the model returned no {what} attention maps")
    if not -len(maps) <= layer < len(maps):
        raise UsageError(f"{what} layer {layer} does not exist: the model has {len(maps)} {what} layers "
                         f"(0..{len(maps) - 1}, or negative from the end)")
    return layer % len(maps), maps[layer]


def encoder_attention_panel(result: ForwardResult, pixel: Sequence[float], layer: int = -1, alpha: float = 0.5,
                            cmap: str = "jet", interpolation: str = "bilinear") -> Tuple[Tensor, str]:
    """Where the encoder token at ``pixel = (x, y)`` (pixels of the original image) attends, in
    encoder ``layer``.

    Returns a ``(3, H, W)`` uint8 panel (the size of ``result.image``) with an ``x`` on the pixel, and its title.
    """
    index, maps = _layer(result.attention["encoder"], layer, "encoder")
    H, W = result.image_hw
    original_hw = result.original_hw
    row, col = pixel_to_cell(pixel, original_hw, result.input_hw, result.padded_hw, result.feature_hw)
    token = row * result.feature_hw[1] + col
    heat = attention_to_image(maps[token], result.feature_hw, result.input_hw, result.padded_hw, result.image_hw,
                              interpolation)
    shown = ((float(pixel[0]) + 0.5) * W / original_hw[1] - 0.5, (float(pixel[1]) + 0.5) * H / original_hw[0] - 0.5)
    panel = draw_cross(overlay_heatmap(result.image, heat, alpha, cmap), shown)
    return panel, f"encoder L{index}, pixel ({pixel[0]:g}, {pixel[1]:g})"


def decoder_attention_panels(result: ForwardResult, detections: Dict[str, Tensor], names: Optional[Dict[int, str]] = None,
                             layer: int = -1, alpha: float = 0.5, cmap: str = "jet",
                             interpolation: str = "bilinear") -> List[Tuple[Tensor, str]]:
    """One panel per detection: its query's cross-attention in decoder ``layer``, with its box.

    ``detections`` as returned by :meth:`ForwardResult.detections`. Returns ``(panel, title)``
    pairs, each panel ``(3, H, W)`` uint8 (the image's size).
    """
    index, maps = _layer(result.attention["decoder"], layer, "decoder")
    names = names or {}
    panels = []
    for q, box, label, score in zip(detections["queries"].tolist(), detections["boxes"], detections["labels"],
                                    detections["scores"]):
        heat = attention_to_image(maps[q], result.feature_hw, result.input_hw, result.padded_hw, result.image_hw,
                                  interpolation)
        panel = draw_detections(overlay_heatmap(result.image, heat, alpha, cmap), box[None], label[None], score[None],
                                names)
        name = names.get(int(label), str(int(label)))
        panels.append((panel, f"decoder L{index}, query {q}: {name} {float(score):.2f}"))
    return panels


def panel_rows(panels: Sequence[Tensor], titles: Sequence[str], max_width: int = MAX_WIDTH, gap: int = 8,
               title_height: int = TITLE_HEIGHT) -> Tensor:
    """Panels with their titles, left to right and then top to bottom, in rows no wider than
    ``max_width`` (a panel wider than that alone in its row).

    With panels ``W`` wide, ``k = max(1, (max_width + gap) // (W + gap))`` fit in a row; the ``n``
    panels fill ``rows = ceil(n / k)`` rows of ``ceil(n / rows)`` (the last may be shorter), ``gap``
    pixels apart both ways. One row is ``(3, title_height + H, n * W + (n - 1) * gap)`` uint8.
    """
    if len(panels) != len(titles):
        raise ValueError(f"got {len(panels)} panels but {len(titles)} titles")
    titled = [with_title(p, t, title_height) for p, t in zip(panels, titles)]
    width = max(p.shape[2] for p in titled)
    rows = math.ceil(len(titled) / max(1, (max_width + gap) // (width + gap)))
    per_row = math.ceil(len(titled) / rows)
    strips = [side_by_side(titled[i: i + per_row], gap=gap) for i in range(0, len(titled), per_row)]
    canvas = torch.full((3, sum(s.shape[1] for s in strips) + gap * (len(strips) - 1),
                         max(s.shape[2] for s in strips)), 255, dtype=torch.uint8)
    y = 0
    for strip in strips:
        canvas[:, y: y + strip.shape[1], : strip.shape[2]] = strip
        y += strip.shape[1] + gap
    return canvas


def attention_picture(result: ForwardResult, pixel: Optional[Sequence[float]] = None,
                      encoder_layers: Union[int, Sequence[int]] = -1, decoder_layer: int = -1,
                      threshold: float = 0.7, max_objects: int = 6, names: Optional[Dict[int, str]] = None,
                      alpha: float = 0.5, cmap: str = "jet", interpolation: str = "bilinear", gap: int = 8,
                      title_height: int = TITLE_HEIGHT, max_width: int = MAX_WIDTH) -> Tensor:
    """Encoder attention of ``pixel`` (``(x, y)`` in the original image, default its centre) in each
    of ``encoder_layers``, then the decoder attention of up to ``max_objects`` detections scoring
    ``>= threshold``.

    Every panel has the image's size ``(H, W)``; they go side by side in rows no wider than
    ``max_width`` pixels (:func:`panel_rows`: six 640-pixel panels make two rows of three). One row
    of ``n`` panels is ``(3, title_height + H, n * W + (n - 1) * gap)`` uint8.
    """
    if result.attention is None:
        raise ValueError("run the model with return_attention=True to draw attention maps")
    if pixel is None:
        pixel = (result.original_hw[1] // 2, result.original_hw[0] // 2)
    layers = [encoder_layers] if isinstance(encoder_layers, int) else list(encoder_layers)
    panels = [encoder_attention_panel(result, pixel, l, alpha, cmap, interpolation) for l in layers]
    detections = result.detections(threshold, max_objects)
    panels += decoder_attention_panels(result, detections, names, decoder_layer, alpha, cmap, interpolation)
    return panel_rows([p for p, _ in panels], [t for _, t in panels], max_width, gap=gap, title_height=title_height)
