"""The optional libraries and the extras that install them.

``pip install detr_irpe`` installs what detection training and evaluation need. Features that
need more are imported inside the functions that use them, through :func:`require`, so that the
core never loads them and a missing one is one clear error naming the extra to install.
"""
from __future__ import annotations

import importlib
from types import ModuleType

from .errors import DetrIrpeError

# import name -> the extra of pyproject.toml that installs it
EXTRAS = {
    "onnx": "export", "onnxruntime": "export", "onnxscript": "export",
    "transformers": "hf", "timm": "hf", "huggingface_hub": "hf",
    "tensorboard": "tensorboard",
    "ultrafast_pycocotools": "fast-eval", "faster_coco_eval": "fast-eval",
    "av": "video",
}


class MissingExtraError(DetrIrpeError, ImportError):
    """An optional library a feature needs is not installed; the message names the extra."""


def require(module: str, feature: str) -> ModuleType:
    """Import ``module`` (e.g. ``onnxruntime``) for ``feature`` (what the user asked for, e.g.
    ``predict --onnx``), or raise :class:`MissingExtraError` saying what to install."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        top = module.split(".")[0]
        extra = EXTRAS.get(top)
        install = f'pip install "detr_irpe[{extra}]"' if extra else f"pip install {top}"
        raise MissingExtraError(f"{feature} needs {top}, which is not installed ({e}): {install}") from None
