"""``predict`` for a panoptic model (``data.dataset=coco_panoptic`` with ``model.masks``): per image
the panoptic map drawn over it with a legend, its COCO panoptic PNG, and its ``segments_info``.

Which classes are stuff comes from the categories of the config's panoptic annotation file (the
validation one, else the training one): a checkpoint stores class names, not the flag.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import List, Optional, Sequence

import torch

from ..config import Config
from ..data.coco import read_json, resolve
from ..data.errors import DatasetNotFoundError, ImageDecodeError
from ..data.images import read_rgb
from ..data.panoptic import is_thing_map
from ..data.transforms import model_input_transform
from ..engine.inference import LoadedDetector
from ..errors import UsageError
from ..files import atomic_write, atomic_write_json
from ..models import PostProcessPanoptic
from ..structures import pad_images
from ..visualize import save_png
from ..visualize.panoptic import draw_panoptic

DETECTIONS_FILE = "detections.json"
PNG_FOLDER = "panoptic"  # the COCO panoptic PNGs, beside the pictures


def panoptic_categories(cfg: Config) -> List[dict]:
    """The ``categories`` (with ``isthing``) of the config's panoptic annotation file."""
    for split in ("val", "train"):
        path = resolve(cfg.data.root, getattr(cfg.data, f"{split}_annotations"))
        if path.is_file():
            categories = read_json(path).get("categories")
            if isinstance(categories, list) and all(isinstance(c, dict) and "isthing" in c for c in categories):
                return categories
    raise UsageError(f"a panoptic model needs to know which classes are stuff: the categories of its panoptic "
                     f"annotation file (data.val_annotations={cfg.data.val_annotations!r} under data.root="
                     f"{cfg.data.root!r}), which is not there. Pass data.root=... (or --config) pointing at it")


@torch.no_grad()
def predict_panoptic(detector: LoadedDetector, paths: Sequence[Path], out_dir, threshold: float = 0.85,
                     names: Optional[Sequence[str]] = None) -> List[dict]:
    """Panoptic segmentation of each image with official DETR's post-processing (queries above
    ``threshold``); writes the picture (``names``: one per image, beside ``out_dir``), the COCO
    panoptic PNG into ``out_dir/panoptic/`` and ``detections.json``: per image ``file``, ``picture``,
    ``panoptic_png``, ``height``, ``width`` and ``detections``, its segments: the PNG's
    ``segments_info`` (``id``, ``category_id``, ``isthing``, ``area``) with each class ``name``. An
    unreadable image is skipped with a warning and an ``error`` entry."""
    out_dir = Path(out_dir)
    categories = panoptic_categories(detector.config)
    postprocess = PostProcessPanoptic(is_thing_map(categories), threshold=threshold)
    labels = {int(c["id"]): str(c.get("name", c["id"])) for c in categories} | detector.categories
    transform = model_input_transform(detector.config.data)
    names = list(names) if names is not None else [f"{Path(p).stem}.png" for p in paths]
    results: List[dict] = []
    for path, name in zip(paths, names):
        try:
            image = read_rgb(path)
        except (ImageDecodeError, DatasetNotFoundError) as e:
            warnings.warn(f"skipped: {e}", UserWarning, stacklevel=2)
            results.append({"file": str(path), "error": str(e), "detections": []})
            continue
        batch, mask = pad_images([transform(image)])
        outputs = detector.model(batch.to(detector.device), mask.to(detector.device),
                                 batched_backbone=detector.batched_backbone)
        result = postprocess(outputs, outputs["input_sizes"].cpu(), torch.tensor([list(image.shape[-2:])]))[0]
        segments = [{**s, "name": labels.get(s["category_id"], str(s["category_id"]))} for s in result["segments_info"]]
        picture = out_dir / name
        png = out_dir / PNG_FOLDER / Path(name).with_suffix(".png")
        save_png(draw_panoptic(image, result["ids"], segments, labels), picture)
        atomic_write(png, lambda f, data=result["png_string"]: f.write(data))
        results.append({"file": str(path), "picture": str(picture), "panoptic_png": str(png),
                        "height": int(image.shape[1]), "width": int(image.shape[2]), "detections": segments})
    atomic_write_json(out_dir / DETECTIONS_FILE, results, indent=1)
    if results and all("error" in r for r in results):
        raise ImageDecodeError("none of the images could be read:\n  " + "\n  ".join(r["error"] for r in results))
    return results
