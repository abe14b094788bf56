"""Reading image files the user points at: one file or a folder of them, any PIL mode, as uint8 RGB."""
from __future__ import annotations

from pathlib import Path
from typing import List

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..errors import InputNotFoundError
from .errors import DatasetNotFoundError, ImageDecodeError

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif"}


def list_images(path) -> List[Path]:
    """``path`` itself if it is a file, else the image files in the folder (sorted)."""
    path = Path(path)
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise InputNotFoundError(f"no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) in folder {path}")
        return files
    raise InputNotFoundError(f"no such image or folder: {path}")


def read_rgb(path) -> torch.Tensor:
    """Any PIL-readable image as ``(3, H, W)`` uint8 RGB: grayscale, palette, RGBA (on white)
    and 16-bit / float images (rescaled to 8 bits) are converted.

    Raises:
        ImageDecodeError: (a ``ValueError``) naming the file, when it is truncated, corrupt,
            too large for PIL or not an image at all.
        DatasetNotFoundError: (a ``FileNotFoundError``) when it does not exist.
    """
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
                arr = np.asarray(im, dtype=np.float64)
                lo, hi = float(arr.min()), float(arr.max())
                arr = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
                im = Image.fromarray(arr.astype(np.uint8), mode="L")
            if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                rgba = im.convert("RGBA")
                background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                im = Image.alpha_composite(background, rgba)
            if im.mode != "RGB":
                im = im.convert("RGB")
            arr = np.asarray(im, dtype=np.uint8)
    except UnidentifiedImageError:
        raise ImageDecodeError(f"cannot read image {path}: not an image format PIL knows (corrupt, empty, or "
                               f"not an image despite its name). Replace or remove the file.") from None
    except FileNotFoundError:
        raise DatasetNotFoundError(f"image file not found: {path}") from None
    except Image.DecompressionBombError as e:
        raise ImageDecodeError(f"cannot read image {path}: {e} Downscale it first (PIL refuses images over "
                               f"2 * PIL.Image.MAX_IMAGE_PIXELS pixels).") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageDecodeError(f"cannot read image {path}: {e}. The file is incomplete or corrupt (truncated "
                               f"download or copy?): replace or remove it.") from None
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))
