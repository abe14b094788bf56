"""Predict boxes on image files: one PNG with the boxes drawn per image, plus a JSON of detections."""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Callable, List, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torchvision.transforms.v2 import functional as F

from ..data.errors import DatasetNotFoundError, ImageDecodeError
from ..data.transforms import make_eval_transforms, normalize
from ..visualize import draw_detections, save_png
from .inference import Detector

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif"}


def list_images(path) -> List[Path]:
    """``path`` itself if it is a file, else the image files in the folder (sorted)."""
    path = Path(path)
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise FileNotFoundError(f"no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) in folder {path}")
        return files
    raise FileNotFoundError(f"no such image or folder: {path}")


class SkippedImageWarning(UserWarning):
    """An input image could not be read; prediction went on with the others."""


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


def model_input_transform(data_cfg) -> Callable[[torch.Tensor], torch.Tensor]:
    """The evaluation transform (shortest side ``eval_size``, longest at most ``max_size``), except
    that an image so elongated that it would get a side of 0 pixels gets 1 instead."""
    transform = make_eval_transforms(data_cfg)

    def apply(image: torch.Tensor) -> torch.Tensor:
        h, w = image.shape[-2:]
        scale = min(data_cfg.eval_size / min(h, w), data_cfg.max_size / max(h, w))
        if int(h * scale) >= 1 and int(w * scale) >= 1:
            return transform(image)
        size = [max(1, round(h * scale)), max(1, round(w * scale))]
        return normalize()(F.resize(image, size, antialias=True))

    return apply


@torch.no_grad()
def predict_images(detector: Detector, paths: Sequence[Path], out_dir, threshold: float = 0.7,
                   device: str = "cpu") -> List[dict]:
    """Run the detector on each image; writes ``<stem>.png`` per image and ``detections.json``.

    Images are resized like evaluation images (shortest side ``data.eval_size``, longest at most
    ``data.max_size``), so huge inputs do not exhaust memory and tiny ones are upscaled.
    Returns one entry per image: the detections (absolute xyxy boxes in the original image)
    above ``threshold``. An image that cannot be read (truncated, corrupt, not an image) is
    skipped with a :class:`SkippedImageWarning`; its entry has an ``error`` and no detections.
    If no image at all can be read, ``ImageDecodeError`` lists them.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    transform = model_input_transform(detector.config.data)
    results = []
    for path in paths:
        try:
            image = read_rgb(path)
        except (ImageDecodeError, DatasetNotFoundError) as e:
            warnings.warn(f"skipped: {e}", SkippedImageWarning, stacklevel=3)
            results.append({"file": str(path), "error": str(e), "detections": []})
            continue
        h, w = image.shape[-2:]
        batch = transform(image).unsqueeze(0).to(device)
        mask = torch.zeros(batch.shape[0], *batch.shape[-2:], dtype=torch.bool, device=device)
        outputs = detector.model(batch, mask)
        det = detector.postprocessor(outputs, torch.tensor([[h, w]], device=device))[0]
        keep = det["scores"] >= threshold
        boxes, labels, scores = det["boxes"][keep].cpu(), det["labels"][keep].cpu(), det["scores"][keep].cpu()
        drawn = draw_detections(image, boxes, labels, scores, detector.categories)
        png = out_dir / f"{Path(path).stem}.png"
        save_png(drawn, png)
        results.append({
            "file": str(path), "picture": str(png), "width": int(w), "height": int(h),
            "detections": [
                {"label": int(l), "name": detector.categories.get(int(l), str(int(l))), "score": round(float(s), 4),
                 "box_xyxy": [round(float(v), 2) for v in b]}
                for b, l, s in zip(boxes, labels, scores)
            ],
        })
    (out_dir / "detections.json").write_text(json.dumps(results, indent=1))
    skipped = [r for r in results if "error" in r]
    if skipped and len(skipped) == len(results):
        raise ImageDecodeError(f"none of the {len(results)} image(s) could be read:\n  "
                               + "\n  ".join(r["error"] for r in skipped))
    return results


def predict_path(checkpoint: str, inputs, out_dir, threshold: float = 0.7, config_path=None, overrides=(),
                 device: str = "auto") -> List[dict]:
    """Load a checkpoint and draw its detections on an image or every image of a folder."""
    from .inference import load_detector

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    paths = [p for item in ([inputs] if isinstance(inputs, (str, Path)) else inputs) for p in list_images(item)]
    detector = load_detector(checkpoint, config_path, overrides, device=device)
    return predict_images(detector, paths, out_dir, threshold=threshold, device=device)
