"""Reading images: one conversion from any PIL image to the ``(3, H, W)`` uint8 RGB tensor that every
path feeds the model (datasets, eval, predict, pictures, :class:`~detr_irpe.Detector`), so that one
file gives one tensor everywhere; and the image files the user points at (a file or a folder).

Modes (:func:`pil_to_rgb`): 1, L, P, RGB, CMYK and YCbCr as PIL converts them to RGB; alpha (RGBA, LA,
PA, P with a transparent colour) composited on white; 16-bit images (I;16, I;16B, I;16L, and I holding
values within 0..65535) mapped by their value range, ``v >> 8`` (``floor(v / 256)``: what torchvision's
``to_dtype(uint8, scale=True)`` gives, and how PIL itself reads 16-bit RGB PNGs), so that each image
keeps its contrast; F images within [0, 1] scaled by 255 (rounded); other I and F images stretched
from their own min..max to 0..255 (their range has no standard meaning).

EXIF orientation, decided once:

- images the user points at (predict, pictures of user images, ``Detector``) are read as photo
  viewers show them: the EXIF orientation is applied (``PIL.ImageOps.exif_transpose``), and boxes are
  in the upright image's pixels (:func:`read_rgb`);
- dataset images follow the annotation file's convention (:func:`dataset_orientation`): the stored
  pixels, EXIF ignored, as pycocotools, torchvision and official DETR read COCO; except when the tag
  turns the image sideways (orientations 5 to 8) and the json's width / height are the turned size
  of a non-square image: that file was annotated as viewers show it, and is loaded turned the same way;
- ``check-data`` lists every image file with an orientation tag (finding ``exif_orientation``).
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Tuple, Union

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import InputNotFoundError, UsageError
from .errors import DatasetNotFoundError, ImageDecodeError

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif"}
ORIENTATION_TAG = 0x0112
# EXIF orientation -> how photo viewers show the stored pixels (1: as stored)
TURNS = {2: "mirrored left-right", 3: "rotated 180°", 4: "mirrored top-bottom",
         5: "rotated 90° clockwise, then mirrored left-right", 6: "rotated 90° clockwise",
         7: "mirrored left-right, then rotated 90° clockwise", 8: "rotated 90° counter-clockwise"}
SIDEWAYS = frozenset({5, 6, 7, 8})  # the orientations that swap width and height
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L")
ALPHA_MODES = ("RGBA", "LA", "PA")  # and P with a transparent colour


def list_images(path, recursive: bool = False) -> List[Path]:
    """``path`` itself if it is a file, else the image files in the folder, sorted; with
    ``recursive`` those of its subfolders too (at any depth, sorted by their path in the folder:
    ``a.jpg``, ``sub/b.jpg``, ``sub/deeper/c.jpg``, ``z.jpg`` as ``sorted`` orders path parts)."""
    path = Path(path)
    if path.is_file():
        return [path]
    if path.is_dir():
        found = path.rglob("*") if recursive else path.iterdir()
        files = sorted(p for p in found if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        if not files:
            where = "folder or its subfolders" if recursive else "folder"
            raise InputNotFoundError(f"no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) in {where} {path}")
        return files
    raise InputNotFoundError(f"no such image or folder: {path}")


def exif_orientation(im: Image.Image) -> int:
    """The EXIF orientation of ``im``, 1 to 8; 1 (as stored) when the tag is absent or invalid."""
    value = im.getexif().get(ORIENTATION_TAG, 1)
    return value if isinstance(value, int) and value in TURNS else 1


def dataset_orientation(orientation: int, stored_wh: Tuple[int, int], json_wh) -> bool:
    """Whether a dataset image is loaded with its EXIF orientation applied (else: its stored pixels).

    ``stored_wh``: the file's (width, height) as stored; ``json_wh``: the annotation file's
    (width, height), None (or Nones) where it gives none. The stored pixels are the convention of
    COCO-format datasets; a sideways tag on a file whose json size is the turned one means that the
    file was annotated as viewers show it. A square image cannot tell, so it stays as stored.

        orientation   stored image   json (width, height)   applied
        1 to 4        any            any                    no
        5 to 8        square         any                    no
        5 to 8        not square     (height, width)        yes
        5 to 8        not square     other, or none         no
    """
    w, h = stored_wh
    return orientation in SIDEWAYS and w != h and tuple(json_wh or ()) == (h, w)


def _to_8_bit(im: Image.Image) -> Image.Image:
    """An I;16* / I / F image as an L image, mapped as the module docstring says."""
    values = np.asarray(im)
    if im.mode in SIXTEEN_BIT_MODES or (im.mode == "I" and values.min() >= 0 and values.max() <= 65535):
        return Image.fromarray((values.astype(np.uint32) >> 8).astype(np.uint8))
    values = values.astype(np.float64)
    lo, hi = float(values.min()), float(values.max())
    if im.mode == "F" and lo >= 0 and hi <= 1:
        return Image.fromarray(np.rint(values * 255).astype(np.uint8))
    stretched = (values - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(values)
    return Image.fromarray(stretched.astype(np.uint8))


def _on_white(im: Image.Image) -> Image.Image:
    """An image with transparency as RGBA composited on an opaque white background."""
    rgba = im.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)


def pil_to_rgb(im: Image.Image, exif: bool) -> torch.Tensor:
    """``im`` (any mode, see the module docstring) as a ``(3, H, W)`` uint8 RGB tensor.

    ``exif``: apply the EXIF orientation first, as photo viewers do (``H, W`` are then the upright
    size); False keeps the stored pixels.
    """
    if exif and exif_orientation(im) != 1:
        im = ImageOps.exif_transpose(im)
    if im.mode in SIXTEEN_BIT_MODES or im.mode in ("I", "F"):
        im = _to_8_bit(im)
    if im.mode in ALPHA_MODES or (im.mode == "P" and "transparency" in im.info):
        im = _on_white(im)
    if im.mode != "RGB":
        im = im.convert("RGB")
    arr = np.asarray(im, dtype=np.uint8)
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


def read_rgb(path) -> torch.Tensor:
    """The image file ``path`` as photo viewers show it: ``(3, H, W)`` uint8 RGB with its EXIF
    orientation applied, any PIL mode converted by :func:`pil_to_rgb`.

    Raises:
        ImageDecodeError: (a ``ValueError``) naming the file, when it is truncated, corrupt,
            too large for PIL or not an image at all.
        DatasetNotFoundError: (a ``FileNotFoundError``) when it does not exist.
    """
    try:
        with Image.open(path) as im:
            im.load()
            return pil_to_rgb(im, exif=True)
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


ImageLike = Union[str, Path, Image.Image, torch.Tensor, np.ndarray]


def as_image_tensor(image: ImageLike) -> torch.Tensor:
    """``(3, H, W)`` RGB: uint8 for files, PIL images and uint8 arrays / tensors; a float tensor
    (values in [0, 1]) stays float. Arrays and tensors may also be ``(H, W, 3)``. Files and PIL images
    are read as photo viewers show them (EXIF orientation applied, any mode converted as predict does).
    What :class:`~detr_irpe.Detector` and :class:`~detr_irpe.export.OnnxDetector` take as an image."""
    if isinstance(image, (str, Path)):
        return read_rgb(image)
    if isinstance(image, Image.Image):
        return pil_to_rgb(image, exif=True)
    if isinstance(image, np.ndarray):
        image = torch.from_numpy(np.ascontiguousarray(image))
    if not isinstance(image, torch.Tensor):
        raise UsageError(f"an image must be a file path, a PIL image, a numpy array or a tensor, "
                         f"got {type(image).__name__}")
    if image.dim() == 3 and image.shape[0] != 3 and image.shape[-1] == 3:
        image = image.permute(2, 0, 1)
    if image.dim() != 3 or image.shape[0] != 3:
        raise UsageError(f"an image tensor must be (3, H, W) or (H, W, 3) RGB, got shape {tuple(image.shape)}")
    if image.dtype == torch.uint8:
        return image.contiguous()
    if not image.is_floating_point():
        raise UsageError(f"an image tensor must be uint8 (0-255) or float (0-1), got {image.dtype}")
    if image.numel() and (image.min() < 0 or image.max() > 1):
        raise UsageError("a float image tensor must hold values in [0, 1]; pass uint8 for 0-255 values")
    return image.float().contiguous()
