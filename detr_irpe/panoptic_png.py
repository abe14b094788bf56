"""The segment-id coding of COCO panoptic PNGs: ``id = R + 256 G + 256^2 B`` (0: void)."""
from __future__ import annotations

import numpy as np


def id_to_rgb(ids: np.ndarray) -> np.ndarray:
    """``(H, W)`` segment ids -> ``(H, W, 3)`` uint8 colours of the PNG."""
    ids = np.asarray(ids, dtype=np.int64)
    return np.stack([ids % 256, ids // 256 % 256, ids // 65536 % 256], axis=-1).astype(np.uint8)


def rgb_to_id(rgb: np.ndarray) -> np.ndarray:
    """``(H, W, 3)`` colours of a COCO panoptic PNG -> ``(H, W)`` int64 segment ids."""
    rgb = np.asarray(rgb, dtype=np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]
