"""Predict boxes on image files: one PNG with the boxes drawn per image, plus a JSON of detections."""
from __future__ import annotations

import json
from pathlib import Path
from typing import List, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torchvision.io import write_png

from ..data.transforms import make_eval_transforms
from ..visualize import draw_detections
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


def read_rgb(path) -> torch.Tensor:
    """Any PIL-readable image as ``(3, H, W)`` uint8 RGB: grayscale, palette, RGBA (on white)
    and 16-bit / float images (rescaled to 8 bits) are converted."""
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
            im = im.convert("RGB")
            arr = np.array(im, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"cannot read image {path}: {e}. Is it a valid, complete image file?") from None
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


@torch.no_grad()
def predict_images(detector: Detector, paths: Sequence[Path], out_dir, threshold: float = 0.7,
                   device: str = "cpu") -> List[dict]:
    """Run the detector on each image; writes ``<stem>.png`` per image and ``detections.json``.

    Images are resized like evaluation images (shortest side ``data.eval_size``, longest at most
    ``data.max_size``), so huge inputs do not exhaust memory and tiny ones are upscaled.
    Returns the detections (absolute xyxy boxes in the original image) above ``threshold``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    transform = make_eval_transforms(detector.config.data)
    results = []
    for path in paths:
        image = read_rgb(path)
        h, w = image.shape[-2:]
        batch = transform(image).unsqueeze(0).to(device)
        mask = torch.zeros(batch.shape[0], *batch.shape[-2:], dtype=torch.bool, device=device)
        outputs = detector.model(batch, mask)
        det = detector.postprocessor(outputs, torch.tensor([[h, w]], device=device))[0]
        keep = det["scores"] >= threshold
        boxes, labels, scores = det["boxes"][keep].cpu(), det["labels"][keep].cpu(), det["scores"][keep].cpu()
        drawn = draw_detections(image, boxes, labels, scores, detector.categories)
        png = out_dir / f"{Path(path).stem}.png"
        write_png(drawn, str(png))
        results.append({
            "file": str(path), "picture": str(png), "width": int(w), "height": int(h),
            "detections": [
                {"label": int(l), "name": detector.categories.get(int(l), str(int(l))), "score": round(float(s), 4),
                 "box_xyxy": [round(float(v), 2) for v in b]}
                for b, l, s in zip(boxes, labels, scores)
            ],
        })
    (out_dir / "detections.json").write_text(json.dumps(results, indent=1))
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
