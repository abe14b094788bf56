"""Predict boxes on image files: one PNG with the boxes drawn per image, plus ``detections.json``.

Outputs go to a folder that is not the inputs' own; a picture is named after its image
(:func:`output_names`), and files of an earlier run are replaced only when asked (``overwrite``).
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Dict, List, Protocol, Sequence

import torch
from torch import Tensor

from ..data.errors import DatasetNotFoundError, ImageDecodeError
from ..data.images import list_images, read_rgb
from ..engine.distributed import pick_device
from ..engine.inference import load_detector
from ..export import OnnxDetector
from ..files import (OutputExistsError, atomic_write_json, check_writable, refuse_existing, refuse_inputs,
                     same_file)
from ..visualize import draw_detections, save_png

DETECTIONS_FILE = "detections.json"


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
    """Image files of ``inputs``: a file, a folder, or a list of them; a file given twice counts once."""
    items = [inputs] if isinstance(inputs, (str, Path)) else list(inputs)
    paths, seen = [], set()
    for path in (path for item in items for path in list_images(item)):
        key = path.resolve()
        if key not in seen:
            seen.add(key)
            paths.append(path)
    return paths


def output_names(paths: Sequence[Path], suffix: str = ".png") -> List[str]:
    """One output file name per input, unique: ``<stem><suffix>``; inputs sharing a stem keep their
    extension (``cat_jpg.png``, ``cat_png.png``), and any name still shared is numbered (``_2``, ...)."""
    stems = [path.stem for path in paths]
    shared = {stem for stem in stems if stems.count(stem) > 1}
    names = [f"{p.stem}_{p.suffix.lstrip('.').lower()}" if p.stem in shared else p.stem for p in paths]
    seen: Dict[str, int] = {}
    unique = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        unique.append(name if seen[name] == 1 else f"{name}_{seen[name]}")
    return [name + suffix for name in unique]


def check_prediction_outputs(paths: Sequence[Path], out_dir: Path, pictures: Sequence[Path],
                             overwrite: bool = False) -> None:
    """Before any work: ``out_dir`` is not the folder of an input, holds no earlier run's files
    (unless ``overwrite``), and can be written.

    Raises:
        OutputExistsError: ``out_dir`` holds input images, or outputs would replace existing files.
        OutputError: ``out_dir`` is a file or cannot be written.
    """
    for path in paths:
        if out_dir.is_dir() and same_file(path.parent, out_dir):
            raise OutputExistsError(
                f"--out {out_dir} is the folder of the input images (e.g. {path}): the pictures would mix with "
                f"them and could replace them. Choose another folder, e.g. --out {out_dir / 'predictions'}")
    outputs = [*pictures, out_dir / DETECTIONS_FILE]
    refuse_inputs(outputs, paths, "choose another --out")
    if not overwrite:
        refuse_existing(outputs, "pass --overwrite to replace them, or choose another --out")
    check_writable(out_dir, "--out")


def predict_images(detector: ImageDetector, paths: Sequence[Path], out_dir, threshold: float = 0.7,
                   batch_size: int = 1, overwrite: bool = False) -> List[dict]:
    """Detect on each image, ``batch_size`` at a time; writes one picture per image (named by
    :func:`output_names`) and ``detections.json`` (one entry per image: file, picture, size, and
    its detections above ``threshold``). Nothing is written over an input, and files of an earlier
    run only with ``overwrite`` (:func:`check_prediction_outputs`, before any work).

    An image that cannot be read (truncated, corrupt, not an image) is skipped with a
    :class:`SkippedImageWarning`; its entry has an ``error`` and no detections. If no image at
    all can be read, ``ImageDecodeError`` lists them.
    """
    out_dir = Path(out_dir)
    paths = [Path(p) for p in paths]
    pictures = [out_dir / name for name in output_names(paths)]
    check_prediction_outputs(paths, out_dir, pictures, overwrite)
    results: List[dict] = []
    step = max(batch_size, 1)
    for start in range(0, len(paths), step):
        entries, images = [], []
        for path, picture in zip(paths[start:start + step], pictures[start:start + step]):
            try:
                images.append(read_rgb(path))
                entries.append({"file": str(path), "picture": str(picture)})
            except (ImageDecodeError, DatasetNotFoundError) as e:
                warnings.warn(f"skipped: {e}", SkippedImageWarning, stacklevel=2)
                entries.append({"file": str(path), "error": str(e), "detections": []})
        readable = [entry for entry in entries if "error" not in entry]
        for entry, image, det in zip(readable, images, detector.detect(images) if images else []):
            records = detection_records(det, threshold, detector.categories)
            drawn = draw_detections(image, torch.tensor([r["box"] for r in records]).reshape(-1, 4),
                                    torch.tensor([r["label"] for r in records], dtype=torch.long),
                                    torch.tensor([r["score"] for r in records]), detector.categories)
            save_png(drawn, entry["picture"])
            entry.update(height=int(image.shape[1]), width=int(image.shape[2]), detections=records)
        results += entries
    atomic_write_json(out_dir / DETECTIONS_FILE, results, indent=1)
    skipped = [r for r in results if "error" in r]
    if skipped and len(skipped) == len(results):
        raise ImageDecodeError(f"none of the {len(results)} image(s) could be read:\n  "
                               + "\n  ".join(r["error"] for r in skipped))
    return results


def predict_path(checkpoint: str, inputs, out_dir, threshold: float = 0.7, config_path=None, overrides=(),
                 device: str = "auto", batch_size: int = 1, batched_backbone: bool = False,
                 overwrite: bool = False) -> List[dict]:
    """Load a checkpoint and draw its detections on an image, a folder, or a list of them.

    ``batched_backbone``: run the CNN on the padded batch, as training does, instead of on each
    image unpadded (faster on a GPU; an image's detections then depend on its batch).
    """
    device = pick_device(device)
    paths = expand_inputs(inputs)
    out_dir = Path(out_dir)
    check_prediction_outputs(paths, out_dir, [out_dir / name for name in output_names(paths)], overwrite)
    detector = load_detector(checkpoint, config_path, overrides, device=device)
    detector.backbone_per_image = not batched_backbone
    return predict_images(detector, paths, out_dir, threshold, batch_size, overwrite)


def predict_onnx(model_path, inputs, out_dir, threshold: float = 0.7, batch_size: int = 1,
                 overwrite: bool = False) -> List[dict]:
    """:func:`predict_images` with an exported ONNX model run by ONNX Runtime (its sidecar JSON
    beside it gives the preprocessing and the class names): the same PNGs and ``detections.json``."""
    paths = expand_inputs(inputs)
    return predict_images(OnnxDetector(model_path), paths, out_dir, threshold, batch_size, overwrite)
