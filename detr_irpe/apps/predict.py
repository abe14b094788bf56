"""Predict boxes on image files: one PNG with the boxes drawn per image, plus ``detections.json``.
A segmentation model's masks are drawn under its boxes and written into ``detections.json`` as
COCO RLE (each detection's ``mask``).

Outputs go to a folder that is not the inputs' own; a picture is named after its image
(:func:`output_names`), and files of an earlier run are replaced only when asked (``overwrite``).
A folder gives its images, and with ``recursive`` those of its subfolders (never those of the
output folder); without it, subfolders holding images are named in a :class:`SkippedImageWarning`.
"""
from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Protocol, Sequence, Tuple

import torch
from torch import Tensor
from tqdm import tqdm

from ..data.errors import DatasetNotFoundError, ImageDecodeError
from ..data.images import IMAGE_EXTENSIONS, list_images, read_rgb
from ..engine.distributed import pick_device
from ..engine.evaluate_panoptic import is_panoptic
from ..engine.inference import load_detector
from ..errors import InputNotFoundError
from ..evaluation import encode_masks
from ..export import OnnxDetector, UnsupportedImageError, detection_records  # detection_records: also from here
from ..files import (OutputExistsError, atomic_write_json, check_writable, refuse_existing, refuse_inputs,
                     same_file)
from ..visualize import draw_detections, save_png
from .predict_panoptic import PNG_FOLDER, predict_panoptic

DETECTIONS_FILE = "detections.json"
_NAMED = 5  # subfolders named in the note of those skipped


class ImageDetector(Protocol):
    """What prediction needs of a detector: :class:`~detr_irpe.engine.inference.LoadedDetector`
    (PyTorch, which takes every image) or :class:`~detr_irpe.export.OnnxDetector`, which also has
    ``image_problem(image) -> Optional[str]``: why its export cannot take an image (its size after
    the resize), None if it can; such an image is skipped by name."""

    categories: Dict[int, str]

    def detect(self, images: Sequence[Tensor]) -> List[Dict[str, Tensor]]:
        """``(3, H, W)`` uint8 images, one batch -> per image ``scores``, ``labels``, absolute xyxy ``boxes``
        (and ``masks`` ``(Q, H, W)`` bool for a segmentation model)."""


class SkippedImageWarning(UserWarning):
    """Inputs were left out and prediction went on with the others: an image that cannot be read,
    one an ONNX export cannot take, or the subfolders of a folder given without ``recursive``."""


def _items(inputs) -> List[Path]:
    return [Path(inputs)] if isinstance(inputs, (str, Path)) else [Path(item) for item in inputs]


def _inside(path: Path, folders: Sequence[Path]) -> bool:
    """Whether ``path`` is one of ``folders`` or lies under one (links resolved)."""
    resolved = path.resolve()
    return any(resolved == folder or folder in resolved.parents for folder in folders)


def expand_inputs(inputs, recursive: bool = False, exclude: Sequence = ()) -> List[Path]:
    """Image files of ``inputs``: a file, a folder, or a list of them; a file given twice counts once.

    ``recursive``: a folder gives the images of its subfolders too (sorted by path,
    :func:`~detr_irpe.data.images.list_images`). ``exclude``: folders whose images a folder input
    holding them does not give (predict passes its output folder, so that pictures of an earlier run
    in a subfolder are never read back as inputs; an output folder that is an input folder itself is
    refused later, by :func:`check_prediction_outputs`).
    """
    excluded = [Path(folder).resolve() for folder in exclude]
    paths, seen = [], set()
    for item in _items(inputs):
        found = list_images(item, recursive)
        below = [folder for folder in excluded if item.is_dir() and item.resolve() in folder.parents]
        if below:
            found = [path for path in found if not _inside(path, below)]
            if not found:
                raise InputNotFoundError(f"no image files in folder {item} outside the output folder "
                                         f"{', '.join(map(str, below))}")
        for path in found:
            key = path.resolve()
            if key not in seen:
                seen.add(key)
                paths.append(path)
    return paths


def _holds_images(folder: Path) -> bool:
    return any(p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file() for p in folder.rglob("*"))


def note_skipped_subfolders(inputs, exclude: Sequence = ()) -> None:
    """For each folder of ``inputs``: a :class:`SkippedImageWarning` naming its subfolders that hold
    images (at any depth; ``exclude``: folders not to name, the output folder), which a prediction
    without ``recursive`` leaves out."""
    excluded = [Path(folder).resolve() for folder in exclude]
    for folder in (item for item in _items(inputs) if item.is_dir()):
        subfolders = sorted(d for d in folder.iterdir()
                            if d.is_dir() and not _inside(d, excluded) and _holds_images(d))
        if subfolders:
            names = ", ".join(d.name for d in subfolders[:_NAMED])
            more = f" and {len(subfolders) - _NAMED} more" if len(subfolders) > _NAMED else ""
            noun = "subfolder" if len(subfolders) == 1 else "subfolders"
            warnings.warn(f"skipped {len(subfolders)} {noun} of {folder}/ ({names}{more}): pass --recursive to "
                          f"include them", SkippedImageWarning, stacklevel=3)


def output_names(paths: Sequence[Path], suffix: str = ".png", relative_to: Sequence = ()) -> List[str]:
    """One output file name per input, unique: ``<stem><suffix>``; inputs sharing a stem keep their
    extension (``cat_jpg.png``, ``cat_png.png``), and any name still shared is numbered (``_2``, ...).

    ``relative_to``: the input folders. An image in a subfolder of one of them (a recursive input)
    is named by its path in that folder, parts joined by ``_``: ``a/cat.jpg`` -> ``a_cat.png``, so
    ``a/cat.jpg`` and ``b/cat.jpg`` keep apart; an image directly in the folder keeps its stem."""
    folders = [Path(folder) for folder in relative_to]
    stems = [_relative_stem(path, folders) for path in paths]
    shared = {stem for stem in stems if stems.count(stem) > 1}
    names = [f"{stem}_{p.suffix.lstrip('.').lower()}" if stem in shared else stem for stem, p in zip(stems, paths)]
    seen: Dict[str, int] = {}
    unique = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        unique.append(name if seen[name] == 1 else f"{name}_{seen[name]}")
    return [name + suffix for name in unique]


def _relative_stem(path: Path, folders: Sequence[Path]) -> str:
    """``path``'s stem, after the subfolders between the first of ``folders`` holding it and the file."""
    for folder in folders:
        try:
            parts = path.relative_to(folder).parts
        except ValueError:
            continue
        return "_".join([*parts[:-1], path.stem])
    return path.stem


def prediction_inputs(inputs, out_dir, recursive: bool = False) -> Tuple[List[Path], List[str]]:
    """The image files of ``inputs`` (:func:`expand_inputs`, the output folder left out) and the name
    of the picture of each (:func:`output_names`); without ``recursive``, subfolders holding images
    are named (:func:`note_skipped_subfolders`)."""
    paths = expand_inputs(inputs, recursive, exclude=[out_dir])
    if not recursive:
        note_skipped_subfolders(inputs, exclude=[out_dir])
    return paths, output_names(paths, relative_to=[item for item in _items(inputs) if item.is_dir()])


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
                   batch_size: int = 1, overwrite: bool = False, names: Optional[Sequence[str]] = None) -> List[dict]:
    """Detect on each image, ``batch_size`` at a time; writes one picture per image (named by
    :func:`output_names`, or ``names``) and ``detections.json`` (one entry per image: file, picture,
    size, and its detections above ``threshold``; for a segmentation model each detection's
    ``mask`` as COCO RLE, drawn in the picture under its box). Nothing is written over an input, and files of an
    earlier run only with ``overwrite`` (:func:`check_prediction_outputs`, before any work). A
    progress bar on stderr counts the images (for two or more, on a terminal; it leaves no trace).

    An image that cannot be read (truncated, corrupt, not an image), or that an ONNX export cannot
    take (a side out of its range after the resize: an image of extreme aspect ratio), is skipped
    with a :class:`SkippedImageWarning` naming it; its entry has an ``error`` and no detections. If
    no image at all can be predicted, ``ImageDecodeError`` (or, when every image could be read,
    :class:`~detr_irpe.export.UnsupportedImageError`) lists them.
    """
    out_dir = Path(out_dir)
    paths = [Path(p) for p in paths]
    pictures = [out_dir / name for name in (output_names(paths) if names is None else names)]
    check_prediction_outputs(paths, out_dir, pictures, overwrite)
    problem_of = getattr(detector, "image_problem", None)  # an ONNX export's size limits (see ImageDetector)
    results: List[dict] = []
    unreadable = 0
    step = max(batch_size, 1)
    # disable=None: no bar when stderr is not a terminal (a log file, a pipe)
    bar = tqdm(total=len(paths), desc="predict", unit="image", leave=False, file=sys.stderr,
               disable=True if len(paths) < 2 else None)
    try:
        for start in range(0, len(paths), step):
            entries, images = [], []
            for path, picture in zip(paths[start:start + step], pictures[start:start + step]):
                try:
                    image = read_rgb(path)
                except (ImageDecodeError, DatasetNotFoundError) as e:
                    warnings.warn(f"skipped: {e}", SkippedImageWarning, stacklevel=2)
                    entries.append({"file": str(path), "error": str(e), "detections": []})
                    unreadable += 1
                    continue
                problem = problem_of(image) if problem_of is not None else None
                if problem is not None:
                    error = f"cannot predict {path}: {problem}"
                    warnings.warn(f"skipped: {error}", SkippedImageWarning, stacklevel=2)
                    entries.append({"file": str(path), "error": error, "height": int(image.shape[1]),
                                    "width": int(image.shape[2]), "detections": []})
                    continue
                images.append(image)
                entries.append({"file": str(path), "picture": str(picture)})
            readable = [entry for entry in entries if "error" not in entry]
            for entry, image, det in zip(readable, images, detector.detect(images) if images else []):
                records = detection_records(det, threshold, detector.categories)
                masks = None
                if "masks" in det:
                    masks = torch.stack([r["mask"] for r in records]) if records else None
                    for record, rle in zip(records, encode_masks(masks) if records else []):
                        record["mask"] = rle
                drawn = draw_detections(image, torch.tensor([r["box"] for r in records]).reshape(-1, 4),
                                        torch.tensor([r["label"] for r in records], dtype=torch.long),
                                        torch.tensor([r["score"] for r in records]), detector.categories,
                                        masks=masks)
                save_png(drawn, entry["picture"])
                entry.update(height=int(image.shape[1]), width=int(image.shape[2]), detections=records)
            results += entries
            bar.update(len(entries))
    finally:
        bar.close()
    atomic_write_json(out_dir / DETECTIONS_FILE, results, indent=1)
    skipped = [r for r in results if "error" in r]
    if skipped and len(skipped) == len(results):
        error = ImageDecodeError if unreadable else UnsupportedImageError
        what = "read" if unreadable == len(results) else "predicted"
        raise error(f"none of the {len(results)} image(s) could be {what}:\n  "
                    + "\n  ".join(r["error"] for r in skipped))
    return results


def predict_path(checkpoint: str, inputs, out_dir, threshold: float = 0.7, *, config_path=None, overrides=(),
                 device: str = "auto", batch_size: int = 1, batched_backbone: bool = False,
                 overwrite: bool = False, recursive: bool = False) -> List[dict]:
    """Load a checkpoint and draw its detections on an image, a folder, or a list of them.

    ``batched_backbone``: run the CNN on the padded batch, as training does, instead of on each
    image unpadded (faster on a GPU; an image's detections then depend on its batch).
    ``recursive``: a folder gives the images of its subfolders too (:func:`prediction_inputs`).
    """
    device = pick_device(device)
    out_dir = Path(out_dir)
    paths, names = prediction_inputs(inputs, out_dir, recursive)
    check_prediction_outputs(paths, out_dir, [out_dir / name for name in names], overwrite)
    detector = load_detector(checkpoint, config_path, overrides, device=device)
    detector.batched_backbone = batched_backbone
    if is_panoptic(detector.config):  # the panoptic map with a legend, PNGs and segments_info
        pngs = [out_dir / PNG_FOLDER / Path(name).with_suffix(".png") for name in names]
        refuse_inputs(pngs, paths, "choose another --out")
        if not overwrite:
            refuse_existing(pngs, "pass --overwrite to replace them, or choose another --out")
        return predict_panoptic(detector, paths, out_dir, threshold, names)
    return predict_images(detector, paths, out_dir, threshold, batch_size, overwrite, names)


def predict_onnx(model_path, inputs, out_dir, threshold: float = 0.7, *, batch_size: int = 1,
                 overwrite: bool = False, recursive: bool = False) -> List[dict]:
    """:func:`predict_images` with an exported ONNX model run by ONNX Runtime (its sidecar JSON
    beside it gives the preprocessing and the class names): the same PNGs and ``detections.json``.
    An image the export cannot take (see :meth:`~detr_irpe.export.OnnxDetector.image_problem`) is
    skipped by name. ``recursive``: as :func:`predict_path`.
    """
    out_dir = Path(out_dir)
    paths, names = prediction_inputs(inputs, out_dir, recursive)
    check_prediction_outputs(paths, out_dir, [out_dir / name for name in names], overwrite)
    return predict_images(OnnxDetector(model_path), paths, out_dir, threshold, batch_size, overwrite, names)
