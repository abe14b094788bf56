"""Model weights as ``.safetensors`` files, with this project's config and categories in the metadata.

A ``.safetensors`` file holds tensors and a string-to-string metadata table, nothing else; reading
it (``safetensors.torch.load_file``) never unpickles anything, so a file cannot run code. We store
``Config.to_dict()`` and the ``{category id: name}`` table as JSON strings in the metadata, which
makes the file self-describing: :func:`load_safetensors` returns the same checkpoint dict
(``model``, ``config``, ``categories``) as a ``.pth`` file written by the trainer, minus the
optimizer state.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict, Mapping, Optional, Union

from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save
from torch import Tensor

from ..errors import CheckpointError
from ..files import atomic_write

CONFIG_KEY = "detr_irpe.config"
CATEGORIES_KEY = "detr_irpe.categories"
# first keys of a transformers DETR state dict; such a file needs the config.json next to it
_HF_PREFIXES = ("model.", "class_labels_classifier.", "bbox_predictor.")


def save_safetensors(path: Union[str, os.PathLike], state_dict: Mapping[str, Tensor],
                     config_dict: Optional[dict] = None, categories: Optional[Mapping[int, str]] = None) -> Path:
    """Write ``state_dict`` to ``path`` (a ``.safetensors`` file), atomically.

    Args:
        state_dict: the model's state dict (tensors only).
        config_dict: ``Config.to_dict()`` of the run, stored as JSON in the metadata (optional).
        categories: ``{category id: name}``, stored as JSON in the metadata (optional).

    Returns the path written. The file appears complete or not at all (written next to it, then
    renamed, :func:`detr_irpe.files.atomic_write`), so an interrupted save never leaves a
    truncated file behind.
    """
    path = Path(path)
    metadata = {"format": "pt"}
    if config_dict is not None:
        metadata[CONFIG_KEY] = json.dumps(config_dict)
    if categories is not None:
        metadata[CATEGORIES_KEY] = json.dumps({str(int(k)): str(v) for k, v in categories.items()})
    payload = save(_unshared(state_dict), metadata=metadata)
    return atomic_write(path, lambda f: f.write(payload))


def _unshared(state_dict: Mapping[str, Tensor]) -> Dict[str, Tensor]:
    """Contiguous tensors that share no memory with each other (safetensors refuses shared storage)."""
    out, seen = {}, set()
    for key, value in state_dict.items():
        value = value.detach().contiguous()
        storage = (value.untyped_storage().data_ptr(), value.device)
        out[key] = value.clone() if storage in seen else value
        seen.add(storage)
    return out


def read_safetensors_weights(path: Union[str, os.PathLike], device: str = "cpu") -> Dict[str, Tensor]:
    """The tensors of a ``.safetensors`` file, whatever its layout (no metadata is interpreted).

    Raises:
        CheckpointError: the file is not a complete safetensors file.
    """
    try:
        return load_file(str(path), device=device)
    except SafetensorError as e:
        raise _corrupt(path, e) from None


def load_safetensors(path: Union[str, os.PathLike], device: str = "cpu") -> dict:
    """Read a file written by :func:`save_safetensors` (or any ``.safetensors`` state dict of this model).

    Returns:
        ``{"model": state dict, "config": dict, "categories": {int: str}}``; ``config`` and
        ``categories`` only when the file's metadata holds them.

    Raises:
        CheckpointError: the file is corrupt or truncated, its metadata is not valid JSON, or it
            holds the weights of a Hugging Face transformers model (read its folder instead).
    """
    state = read_safetensors_weights(path, device)
    if any(k.startswith(_HF_PREFIXES) for k in state):
        raise CheckpointError(
            f"{path} holds the weights of a Hugging Face transformers DETR (keys such as "
            f"{next(k for k in state if k.startswith(_HF_PREFIXES))!r}); their meaning depends on the config.json "
            f"saved with them. Pass the folder that holds both files instead of the .safetensors file")
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata() or {}
    checkpoint: dict = {"model": state}
    try:
        if CONFIG_KEY in metadata:
            checkpoint["config"] = json.loads(metadata[CONFIG_KEY])
        if CATEGORIES_KEY in metadata:
            checkpoint["categories"] = {int(k): v for k, v in json.loads(metadata[CATEGORIES_KEY]).items()}
    except (ValueError, AttributeError) as e:
        raise CheckpointError(f"{path}: the {CONFIG_KEY} / {CATEGORIES_KEY} metadata is not what "
                              f"save_safetensors writes ({e}). Save the file again") from None
    return checkpoint


def _corrupt(path, error: Exception) -> CheckpointError:
    size = f"{Path(path).stat().st_size} bytes; " if Path(path).is_file() else ""
    return CheckpointError(f"{path} is not a readable safetensors file ({size}{error}); it is corrupt or truncated, "
                           f"or not a safetensors file at all. Download or save it again")
