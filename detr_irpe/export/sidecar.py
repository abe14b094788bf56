"""The JSON written beside an exported model: what a deployment needs to feed it and read it.

``model.onnx`` gets ``model.onnx.json`` (``model.pt2`` gets ``model.pt2.json``: two exports in one
folder keep a sidecar each) with the class names, the preprocessing
(:class:`~detr_irpe.export.preprocess.Preprocessing`), the input and output names, shapes and
meaning, the accepted input sizes, the iRPE spec of each encoder layer, the ONNX opset and how
the export was checked against PyTorch. Exports made before this naming have ``model.json``;
:func:`find_sidecar` still reads it when its ``model_file`` names the model.
"""
from __future__ import annotations

import json
from importlib import metadata
from pathlib import Path
from typing import Dict, List, Optional

import torch

from ..errors import InputNotFoundError, UsageError
from ..files import atomic_write_json
from .preprocess import Preprocessing
from .program import INPUT_NAMES, MASK_OUTPUT, OUTPUT_NAMES, InputLimits

SIDECAR_VERSION = 1
REQUIRED_KEYS = ("format", "model_file", "inputs", "outputs", "input_size", "preprocess", "categories")


def _package_version() -> str:
    try:
        return metadata.version("detr_irpe")
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


def sidecar_path(model_path) -> Path:
    """Where an export writes its sidecar: ``model.onnx`` -> ``model.onnx.json``."""
    model_path = Path(model_path)
    return model_path.with_name(model_path.name + ".json")


def legacy_sidecar_path(model_path) -> Path:
    """The sidecar of exports made before :func:`sidecar_path` named it after the whole file:
    ``model.onnx`` -> ``model.json``, shared by every export of that stem."""
    return Path(model_path).with_suffix(".json")


def _describes(path: Path, model_path: Path) -> bool:
    """Whether the JSON at ``path`` is a sidecar whose ``model_file`` is ``model_path``'s name."""
    try:
        info = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(info, dict) and info.get("model_file") == model_path.name


def find_sidecar(model_path) -> Path:
    """The sidecar of the export at ``model_path``: ``<model>.json`` (:func:`sidecar_path`), or for an
    export made before that naming, ``<stem>.json`` if it describes this model file (its ``model_file``).

    Raises:
        InputNotFoundError: neither is there; the message names both.
    """
    model_path = Path(model_path)
    path = sidecar_path(model_path)
    if path.is_file():
        return path
    legacy = legacy_sidecar_path(model_path)
    if legacy.is_file() and _describes(legacy, model_path):
        return legacy
    other = (f" ({legacy.name} beside it describes another model file)" if legacy.is_file() else "")
    raise InputNotFoundError(f"no sidecar JSON for {model_path}: expected {path}, which `detr-irpe export` writes "
                             f"beside the model{other}; export the model again, or pass the sidecar's path if it "
                             f"lies elsewhere")


def deployment_info(*, model_file: str, fmt: str, opset: Optional[int], preprocess: Preprocessing,
                    categories: Dict[int, str], num_classes: int, num_queries: int, limits: InputLimits,
                    stride: int, irpe: List[Optional[str]], check: dict, masks: bool = False) -> dict:
    """The sidecar's content (a JSON-ready dict); ``masks``: the model also outputs ``pred_masks``."""
    info = {
        "sidecar_version": SIDECAR_VERSION,
        "format": fmt,
        "model_file": model_file,
        "opset": opset,
        "inputs": [
            {"name": INPUT_NAMES[0], "shape": ["batch", 3, "height", "width"], "dtype": "float32",
             "meaning": "RGB images after `preprocess`, NCHW, padded with zeros at the bottom / right to a "
                        "common size"},
            {"name": INPUT_NAMES[1], "shape": ["batch", "height", "width"], "dtype": "bool",
             "meaning": "True on padding"},
        ],
        "outputs": [
            {"name": OUTPUT_NAMES[0], "shape": ["batch", num_queries, num_classes + 1], "dtype": "float32",
             "meaning": "class logits of each query (final decoder layer); the last class is 'no object'"},
            {"name": OUTPUT_NAMES[1], "shape": ["batch", num_queries, 4], "dtype": "float32",
             "meaning": "boxes (cx, cy, w, h), normalised by each image's own (unpadded) width and height"},
        ],
        "input_size": {"min_side": limits.min_side, "max_side": limits.max_side, "backbone_stride": stride},
        "preprocess": {
            **preprocess.to_dict(),
            "resize": "scale s = min(eval_size / shorter side, max_size / longer side); new side = "
                      "int(side * s) (round(side * s), at least 1, if that would be 0); bilinear, antialiased",
            "normalize": "(uint8 / 255 - mean) / std per RGB channel",
        },
        "postprocess": "score, label = max over the first num_classes of softmax(pred_logits); box = pred_boxes "
                       "as (x1, y1, x2, y2) times (width, height, width, height) of the original image",
        "num_classes": num_classes,
        "num_queries": num_queries,
        "categories": {str(k): v for k, v in sorted(categories.items())},
        "irpe": irpe,
        "checked_against_pytorch": check,
        "exported_by": {"detr_irpe": _package_version(), "torch": torch.__version__},
    }
    if masks:
        info["outputs"].append(
            {"name": MASK_OUTPUT, "shape": ["batch", num_queries, "height_4", "width_4"], "dtype": "float32",
             "meaning": "mask logits of each query (final decoder layer) at stride 4 of the padded input: the "
                        "backbone's stride-4 feature map, ceil(height / 4) x ceil(width / 4) for a ResNet"})
        info["postprocess_masks"] = ("per image: pred_masks upsampled (bilinear, align_corners=False) to the padded "
                                     "input size, sigmoid > 0.5, cropped to the image's resized size, then resized "
                                     "(nearest) to the original image size")
    return info


def write_sidecar(info: dict, path) -> Path:
    """Write ``info`` as the sidecar JSON at ``path`` (atomically)."""
    return atomic_write_json(path, info, indent=1)


def read_sidecar(path) -> dict:
    """The sidecar at ``path``; raises ``InputNotFoundError`` / ``UsageError`` naming what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise InputNotFoundError(f"no sidecar JSON at {path}: an exported model is read with the {path.name} that "
                                 f"detr_irpe's exporter writes beside it (pass its path if it lies elsewhere)")
    try:
        info = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UsageError(f"{path} is not a readable JSON file ({e})") from None
    missing = [k for k in REQUIRED_KEYS if not isinstance(info, dict) or k not in info]
    if missing:
        raise UsageError(f"{path} is not a detr_irpe export sidecar: it lacks {', '.join(missing)}")
    return info
