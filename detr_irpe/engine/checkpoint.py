"""Reading checkpoint files and loading them into a model, including the official DETR and
iRPE-DETR releases, ``.safetensors`` files and Hugging Face ``transformers`` DETR models.

Checkpoints are dicts holding the model's state dict under ``model`` and, when written by a
training script, ``optimizer``, ``lr_scheduler``, ``epoch`` and ``args``. ``.pth`` files are read
with ``torch.load(weights_only=True)``: tensors, plain containers and, because the DETR and iRPE
training scripts store their command line that way, ``argparse.Namespace`` — no other class.
``.safetensors`` files hold only tensors and strings and are read without unpickling anything.
A transformers model (a folder, or a hub id) becomes the same kind of dict (``model``, ``config``,
``categories``), see :mod:`detr_irpe.interop`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Tuple, Union
from urllib.parse import urlparse

import torch
from torch import Tensor, nn

from ..errors import CheckpointError, CheckpointNotFoundError
from .diagnose import SAFE_CLASSES, diagnose
from ..interop import (checkpoint_from_hf, download_from_hub, hf_weights_file, is_hf_folder, is_hub_id,
                       load_safetensors, read_hf_config, read_processor_format, read_processor_size,
                       read_safetensors_weights)
from ..models.segmentation import DETRsegm
from ..models.state_dict import StateDictDiff, compare_state_dict, describe

# Heads whose shape depends on the dataset or the number of queries; fine-tuning may re-initialise them.
FINETUNE_HEADS = ("class_embed", "query_embed", "group_query_embed")
EXTRA_GROUPS = "group_query_embed."  # Group DETR's training-only query groups
DETECTOR = "detr."  # a segmentation model's detector (DETRsegm: detr.*, bbox_attention.*, mask_head.*)
TRAINING_KEYS = ("model", "optimizer", "lr_scheduler", "epoch")  # what --resume needs in a checkpoint


@dataclass
class LoadReport:
    """What :func:`load_model_weights` / :func:`load_for_finetuning` did.

    Attributes:
        loaded: checkpoint keys copied into the model.
        skipped: model keys left at their fresh initialisation because the checkpoint's shape
            differs (fine-tuning heads, e.g. ``class_embed.*`` for another number of classes).
        initialised: model keys absent from the checkpoint and initialised here (iRPE lookup
            tables, kept at zero when starting from a plain DETR checkpoint; extra query groups).
        missing: other model keys absent from the checkpoint (only with ``strict=False``).
        unexpected: checkpoint keys the model has no place for (``strict=False``, or query
            groups that fine-tuning leaves out).
    """

    loaded: List[str] = field(default_factory=list)
    skipped: List[str] = field(default_factory=list)
    initialised: List[str] = field(default_factory=list)
    missing: List[str] = field(default_factory=list)
    unexpected: List[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"loaded {len(self.loaded)} tensors from the checkpoint"]
        if self.skipped:
            lines.append(f"re-initialised (shape differs from the checkpoint): {', '.join(self.skipped)}")
        if self.initialised:
            lines.append(f"initialised (not in the checkpoint; iRPE tables at zero): {', '.join(self.initialised)}")
        if self.missing:
            lines.append(f"missing from the checkpoint: {', '.join(self.missing)}")
        if self.unexpected:
            lines.append(f"ignored (not in the model): {', '.join(self.unexpected)}")
        return "\n".join(lines)


# -- reading files ------------------------------------------------------------------------


def load_checkpoint_file(path_or_url: Union[str, os.PathLike], map_location="cpu") -> dict:
    """Read a checkpoint: a ``.pth`` file, a ``.safetensors`` file, a Hugging Face ``transformers``
    DETR folder (``config.json`` + ``model.safetensors`` or ``pytorch_model.bin``), a hub id such
    as ``facebook/detr-resnet-50`` (``@revision`` optional), or an http(s) URL of a file (downloaded
    first).

    A hub id is tried only when no local file or folder has that name; its files are fetched
    into (or found in) the Hugging Face cache. ``.safetensors`` files and transformers models give
    ``{"model", "config", "categories"}`` (``config`` / ``categories`` when known), with the
    official DETR keys; ``map_location`` must then be a device name.

    Raises:
        CheckpointNotFoundError: (a ``FileNotFoundError``) no such file, or a folder without
            ``config.json`` or without weights.
        CheckpointError: the download failed; the file is not a PyTorch checkpoint, is corrupt or
            truncated, or names code to run when unpickled (a class other than
            ``argparse.Namespace``), which ``weights_only=True`` refuses (the message says which,
            :func:`~detr_irpe.engine.diagnose.diagnose`); a hub id cannot be fetched; a transformers
            model does not map exactly onto this project's DETR (the message lists why).
    """
    source = str(path_or_url)
    if _is_url(path_or_url):
        path = _download(source)
    else:
        path = Path(path_or_url).expanduser()
        if is_hf_folder(path) or (not path.exists() and is_hub_id(source)):
            return _load_hf(path if path.exists() else download_from_hub(source), source, map_location)
    if not path.is_file():
        hint = " (a folder without config.json, so not a Hugging Face model)" if path.is_dir() else ""
        if path.is_dir() and (path / "checkpoint.pth").is_file():
            hint += f"; the checkpoint of a training run is {path / 'checkpoint.pth'}"
        raise CheckpointNotFoundError(f"checkpoint file not found: {path}{hint}. Pass the path of a .pth or "
                                      f".safetensors file, a Hugging Face model folder or hub id, or an http(s) "
                                      f"URL to download")
    if path.suffix == ".safetensors":
        return load_safetensors(path, device=str(map_location))
    return _torch_load(path, map_location)


def _load_hf(folder: Path, source: str, map_location) -> dict:
    """A transformers DETR folder as our checkpoint dict."""
    weights = hf_weights_file(folder)
    if weights.suffix == ".safetensors":
        state = read_safetensors_weights(weights, device=str(map_location))
    else:
        state = state_dict_from_checkpoint(_torch_load(weights, map_location))
    return checkpoint_from_hf(state, read_hf_config(folder), source=source, image_size=read_processor_size(folder),
                              panoptic=read_processor_format(folder) == "coco_panoptic")


def _torch_load(path: Path, map_location) -> dict:
    """``torch.load(weights_only=True)`` of a file that must hold a dict; when it fails, the file
    itself says why (:func:`~detr_irpe.engine.diagnose.diagnose`)."""
    try:
        with torch.serialization.safe_globals(SAFE_CLASSES):
            obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # the unpickler fails in many ways, and its messages tell them apart poorly
        raise CheckpointError(diagnose(path, e)) from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(obj).__name__}, expected a dict "
                              f"(a state dict, or a dict with the state dict under 'model')")
    return obj


def _is_url(path_or_url) -> bool:
    return isinstance(path_or_url, str) and urlparse(path_or_url).scheme in ("http", "https")


def _download(url: str) -> Path:
    """Download ``url`` once into torch hub's checkpoint directory; return the local path."""
    target = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            torch.hub.download_url_to_file(url, str(target), progress=True)
        except OSError as e:  # URLError, timeouts and DNS failures are OSErrors
            raise CheckpointError(
                f"could not download {url} ({e}). Without network access, download the file on another "
                f"machine and pass its local path instead of the URL") from None
    return target


def require_training_checkpoint(ckpt: dict, path) -> None:
    """Raise unless ``ckpt`` holds what ``--resume`` needs (a training checkpoint of this project)."""
    for key in TRAINING_KEYS:
        if key not in ckpt:
            raise CheckpointError(f"{path} is not a training checkpoint of this project (no '{key}'); "
                                  f"to start from its weights use train.pretrained={path}")


def state_dict_from_checkpoint(obj: Mapping) -> Dict[str, Tensor]:
    """The model state dict of a checkpoint: ``obj["model"]``, or ``obj`` itself if it is one.

    A ``module.`` prefix on every key (a model saved while wrapped in DistributedDataParallel)
    is removed.
    """
    state = obj.get("model") if isinstance(obj.get("model"), Mapping) else obj
    if not state or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(f"no model state dict in this checkpoint: expected tensors under 'model' or a "
                              f"bare state dict, found keys {sorted(obj)[:10]}")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return dict(state)


# -- loading into a model -----------------------------------------------------------------


def _compare(model: nn.Module, state_dict: Mapping[str, Tensor]) -> Tuple[List[str], List[str], List[tuple]]:
    """Model keys missing from ``state_dict``, unexpected keys, and ``(key, model shape, ckpt shape)``
    (:func:`~detr_irpe.models.state_dict.compare_state_dict`)."""
    diff = compare_state_dict(model.state_dict(), state_dict)
    return diff.missing, diff.unexpected, diff.mismatched


def _what(action: str, source: Optional[str]) -> str:
    return f"{action} ({source})" if source else action


def _head_module(key: str) -> Optional[str]:
    """The fine-tuning head ``key`` belongs to (``class_embed``, or ``detr.class_embed`` in a
    segmentation model), or None."""
    parts = key.split(".")
    at = 1 if parts[0] == DETECTOR[:-1] and len(parts) > 2 else 0
    return ".".join(parts[:at + 1]) if parts[at] in FINETUNE_HEADS else None


def _is_head(key: str) -> bool:
    return _head_module(key) is not None


def _is_segmentation_state(state: Mapping[str, Tensor]) -> bool:
    return any(k.startswith(DETECTOR) for k in state)


def detector_state_dict(state: Mapping[str, Tensor]) -> Dict[str, Tensor]:
    """The detector of a state dict: itself for a DETR, the ``detr.*`` part (prefix removed) of a
    segmentation model's (its mask head left out)."""
    if not _is_segmentation_state(state):
        return dict(state)
    return {k[len(DETECTOR):]: v for k, v in state.items() if k.startswith(DETECTOR)}


def _mismatch_error(missing: List[str], unexpected: List[str], mismatched: List[tuple], what: str) -> CheckpointError:
    """The error for keys that do not fit, with hints on the command-line options that fix common cases."""
    msg = f"{what}: the checkpoint does not fit this model (was it trained with another configuration?)"
    msg += describe(StateDictDiff(missing, unexpected, mismatched))
    hints = []
    if any("lookup_table" in k for k in unexpected):
        hints.append("the checkpoint has iRPE tables: build the model with the matching rpe spec "
                     "(e.g. model.rpe=rpe-2.0-product-ctx-1-k)")
    if missing and all("lookup_table" in k for k in missing):
        hints.append("only iRPE tables are missing: to start an iRPE model from a plain DETR checkpoint, pass it "
                     "as train.pretrained=PATH, which starts the missing tables at zero (in Python: "
                     "load_for_finetuning)")
    if any(_is_head(k) for k, _, _ in mismatched):
        hints.append("class_embed / query_embed differ (another num_classes / num_queries): to fine-tune, pass "
                     "the checkpoint as train.pretrained=PATH, which re-initialises those heads (in Python: "
                     "load_for_finetuning)")
    return CheckpointError(msg + "".join(f"\n  hint: {h}" for h in hints))


def check_model_weights(model: nn.Module, state_dict: Mapping[str, Tensor], source: Optional[str] = None) -> None:
    """Raise unless ``state_dict`` fits ``model`` as :func:`load_model_weights` with ``strict`` needs it.

    Nothing is copied, so ``model`` may live on the meta device.

    Raises:
        CheckpointError: listing every missing / unexpected key and every shape mismatch.
    """
    diff = compare_state_dict(model.state_dict(), state_dict)
    if diff:
        raise _mismatch_error(diff.missing, diff.unexpected, diff.mismatched,
                              _what("the weights do not fit the model", source))


def load_model_weights(model: nn.Module, state_dict: Mapping[str, Tensor], strict: bool = True,
                       source: Optional[str] = None) -> LoadReport:
    """Copy ``state_dict`` into ``model``.

    Shapes must always agree. With ``strict`` (the default) the key sets must be identical;
    otherwise missing and unexpected keys are tolerated and listed in the report. ``source``
    (e.g. the file name) is quoted in error messages.

    Raises:
        CheckpointError: listing every missing / unexpected key and every shape mismatch
            (key, expected shape, checkpoint shape).
    """
    missing, unexpected, mismatched = _compare(model, state_dict)
    if mismatched or (strict and (missing or unexpected)):
        raise _mismatch_error(missing, unexpected, mismatched, _what("cannot load weights", source))
    model.load_state_dict({k: v for k, v in state_dict.items() if k not in unexpected}, strict=False)
    loaded = sorted(k for k in state_dict if k not in unexpected)
    return LoadReport(loaded=loaded, missing=missing, unexpected=unexpected)


def load_for_finetuning(model: nn.Module, state_dict: Mapping[str, Tensor],
                        source: Optional[str] = None) -> LoadReport:
    """Start ``model`` from a checkpoint trained with another head size or without iRPE.

    * ``class_embed.*`` / ``query_embed.*`` whose shapes differ from the checkpoint (another
      ``num_classes`` / ``num_queries``) are re-initialised and reported in ``skipped``.
    * iRPE lookup tables missing from the checkpoint (a plain DETR checkpoint loaded into an
      iRPE model) are set to zero, so the model starts out computing what the checkpoint
      computed; they are reported in ``initialised``.
    * Extra query groups (``model.query_groups``) missing from the checkpoint keep their fresh
      initialisation (``initialised``); a checkpoint's groups the model does not have are left
      out (``unexpected``).
    * A detection checkpoint starts a segmentation model's detector (its mask head keeps its fresh
      initialisation, ``initialised``); a segmentation checkpoint starts a detector (its mask head
      is left out, ``unexpected``).

    Raises:
        CheckpointError: any other missing / unexpected key or shape mismatch.
    """
    segmentation = isinstance(model, DETRsegm)
    if segmentation != _is_segmentation_state(state_dict):
        if segmentation:
            state_dict = {DETECTOR + k: v for k, v in state_dict.items()}
        else:
            state_dict = {**detector_state_dict(state_dict),
                          **{k: v for k, v in state_dict.items() if not k.startswith(DETECTOR)}}
    missing, unexpected, mismatched = _compare(model, state_dict)
    heads = [m for m in mismatched if _is_head(m[0])]
    mask_head = ("bbox_attention.", "mask_head.")
    fresh = [k for k in missing if "lookup_table" in k or k.startswith(EXTRA_GROUPS) or k.startswith(mask_head)]
    left_out = [k for k in unexpected if k.startswith(EXTRA_GROUPS) or k.startswith(mask_head)]
    other_mismatched = [m for m in mismatched if m not in heads]
    other_missing = [k for k in missing if k not in fresh]
    other_unexpected = [k for k in unexpected if k not in left_out]
    if other_mismatched or other_missing or other_unexpected:
        raise _mismatch_error(other_missing, other_unexpected, other_mismatched,
                              _what("cannot fine-tune from this checkpoint", source))
    skipped = sorted(k for k, _, _ in heads)
    model.load_state_dict({k: v for k, v in state_dict.items() if k not in skipped and k not in left_out},
                          strict=False)
    for name in {_head_module(k) for k in skipped}:
        model.get_submodule(name).reset_parameters()
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key in fresh:
            if "lookup_table" in key:
                params[key].zero_()
    loaded = sorted(k for k in state_dict if k not in skipped and k not in left_out)
    return LoadReport(loaded=loaded, skipped=skipped, initialised=fresh, unexpected=left_out)


def load_frozen_weights(model: nn.Module, path: str) -> LoadReport:
    """``train.frozen_weights``: the second stage of DETR's segmentation recipe. Load a detection
    checkpoint (any format :func:`load_checkpoint_file` reads; of a segmentation model, its
    detector) into ``model.detr`` (``strict``) and freeze it, so that only the mask head trains.

    Raises:
        CheckpointError: ``model`` has no mask head, or the weights do not fit its detector.
    """
    if not isinstance(model, DETRsegm):
        raise CheckpointError(f"train.frozen_weights={path} freezes the detector of a segmentation model and "
                              f"trains its mask head: set model.masks=true")
    state = detector_state_dict(state_dict_from_checkpoint(load_checkpoint_file(path)))
    state = {k: v for k, v in state.items() if not k.startswith(EXTRA_GROUPS)}  # Group DETR's training queries
    report = load_model_weights(model.detr, state, strict=True, source=f"train.frozen_weights={path}")
    model.freeze_detr()
    return report
