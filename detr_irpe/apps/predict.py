"""Predict boxes on image files: one PNG with the boxes drawn per image, plus ``detections.json``."""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Dict, List, Protocol, Sequence

import torch
from torch import Tensor

from ..data.errors import DatasetNotFoundError, ImageDecodeError
from ..data.images import list_images, read_rgb
from ..engine.inference import load_detector
from ..export import OnnxDetector
from ..visualize import draw_detections, save_png


class ImageDetector(Protocol):
    """What prediction needs of a detector: :class:`~detr_irpe.engine.inference.LoadedDetector`
    (PyTorch) or the ONNX Runtime runner."""

    categories: Dict[int, str]

    def detect(self, images: Sequence[Tensor]) -> List[Dict[str, Tensor]]:
        """``(3, H, W)`` uint8 images, one batch -> per image ``scores``, ``labels``, absolute xyxy ``boxes``."""


class SkippedImageWarning(UserWarning):
    """An input image could not be read; prediction went on with the others."""


def detection_records(detections: Dict[str, Tensor], threshold: float, categories: Dict[int, str]) -> List[dict]:
    """The detections scoring at least ``threshold``, best first, as
    ``{"box": [x1, y1, x2, y2], "score", "label", "name"}`` (box in the image's pixels)."""
    scores, labels, boxes = detections["scores"], detections["labels"], detections["boxes"]
    keep = (scores >= threshold).nonzero().flatten()
    keep = keep[scores[keep].argsort(descending=True)].tolist()
    return [{"box": boxes[i].tolist(), "score": float(scores[i]), "label": int(labels[i]),
             "name": categories.get(int(labels[i]), str(int(labels[i])))} for i in keep]


def expand_inputs(inputs) -> List[Path]:
    """Image files of ``inputs``: a file, a folder, or a list of them."""
    items = [inputs] if isinstance(inputs, (str, Path)) else list(inputs)
    return [path for item in items for path in list_images(item)]


def predict_images(detector: ImageDetector, paths: Sequence[Path], out_dir, threshold: float = 0.7,
                   batch_size: int = 1) -> List[dict]:
    """Detect on each image, ``batch_size`` at a time; writes ``<stem>.png`` per image and
    ``detections.json`` (one entry per image: file, size, and its detections above ``threshold``).

    An image that cannot be read (truncated, corrupt, not an image) is skipped with a
    :class:`SkippedImageWarning`; its entry has an ``error`` and no detections. If no image at
    all can be read, ``ImageDecodeError`` lists them.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results: List[dict] = []
    for start in range(0, len(paths), max(batch_size, 1)):
        entries, images = [], []
        for path in paths[start:start + max(batch_size, 1)]:
            try:
                images.append(read_rgb(path))
                entries.append({"file": str(path)})
            except (ImageDecodeError, DatasetNotFoundError) as e:
                warnings.warn(f"skipped: {e}", SkippedImageWarning, stacklevel=2)
                entries.append({"file": str(path), "error": str(e), "detections": []})
        readable = [entry for entry in entries if "error" not in entry]
        for entry, image, det in zip(readable, images, detector.detect(images) if images else []):
            records = detection_records(det, threshold, detector.categories)
            drawn = draw_detections(image, torch.tensor([r["box"] for r in records]).reshape(-1, 4),
                                    torch.tensor([r["label"] for r in records], dtype=torch.long),
                                    torch.tensor([r["score"] for r in records]), detector.categories)
            png = out_dir / f"{Path(entry['file']).stem}.png"
            save_png(drawn, png)
            entry.update(picture=str(png), height=int(image.shape[1]), width=int(image.shape[2]), detections=records)
        results += entries
    (out_dir / "detections.json").write_text(json.dumps(results, indent=1))
    skipped = [r for r in results if "error" in r]
    if skipped and len(skipped) == len(results):
        raise ImageDecodeError(f"none of the {len(results)} image(s) could be read:\n  "
                               + "\n  ".join(r["error"] for r in skipped))
    return results


def predict_path(checkpoint: str, inputs, out_dir, threshold: float = 0.7, config_path=None, overrides=(),
                 device: str = "auto", batch_size: int = 1, batched_backbone: bool = False) -> List[dict]:
    """Load a checkpoint and draw its detections on an image, a folder, or a list of them.

    ``batched_backbone``: run the CNN on the padded batch, as training does, instead of on each
    image unpadded (faster on a GPU; an image's detections then depend on its batch).
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    paths = expand_inputs(inputs)
    detector = load_detector(checkpoint, config_path, overrides, device=device)
    detector.backbone_per_image = not batched_backbone
    return predict_images(detector, paths, out_dir, threshold, batch_size)


def predict_onnx(model_path, inputs, out_dir, threshold: float = 0.7, batch_size: int = 1) -> List[dict]:
    """:func:`predict_images` with an exported ONNX model run by ONNX Runtime (its sidecar JSON
    beside it gives the preprocessing and the class names): the same PNGs and ``detections.json``."""
    paths = expand_inputs(inputs)
    return predict_images(OnnxDetector(model_path), paths, out_dir, threshold, batch_size)
