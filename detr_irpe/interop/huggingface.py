"""Hugging Face ``transformers`` DETR folders (and hub ids) <-> checkpoint dicts of this project.

A transformers DETR is a folder holding ``config.json`` and ``model.safetensors`` (older uploads:
``pytorch_model.bin``), as ``DetrForObjectDetection.save_pretrained`` writes it and as models
such as ``facebook/detr-resnet-50`` sit on the hub. :func:`checkpoint_from_hf` turns its config
and weights into what :func:`detr_irpe.engine.checkpoint.load_checkpoint_file` returns for our
own files; :func:`save_hf_folder` writes the other way. Reading the weights file itself is the
caller's job (``load_checkpoint_file`` reads ``pytorch_model.bin`` with the same restricted
``torch.load`` as any checkpoint).
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Mapping, Optional, Union

from torch import Tensor

from ..config import Config, ModelConfig
from ..errors import CheckpointError, CheckpointNotFoundError
from ..files import atomic_write_text, make_folder
from .hf_config import (backbone_from_hf, categories_from_hf, hf_backbone_for, hf_config_from_model,
                        model_config_from_hf)
from .hf_weights import check_fits, hf_to_ours, our_shapes, ours_to_hf, position_embedding_prefix
from .safetensors_io import save_safetensors

CONFIG_FILE = "config.json"
WEIGHTS_FILES = ("model.safetensors", "pytorch_model.bin")  # in order of preference
WRITTEN_FILES = (CONFIG_FILE, WEIGHTS_FILES[0])  # what save_hf_folder writes
# "namespace/name" or "namespace/name@revision", as on the hub; a local path is tried first
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*(@[\w./-]+)?")
_FILE_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".ckpt", ".tar", ".json", ".yaml", ".yml")


def is_hub_id(text: str) -> bool:
    """True for ``namespace/name`` (optionally ``@revision``) that does not end like a file name."""
    return bool(_HUB_ID.fullmatch(text)) and not text.lower().endswith(_FILE_SUFFIXES)


def is_hf_folder(path: Union[str, os.PathLike]) -> bool:
    return (Path(path) / CONFIG_FILE).is_file()


def download_from_hub(hub_id: str) -> Path:
    """Fetch ``config.json`` and the weights of ``hub_id`` (``namespace/name[@revision]``) into the
    Hugging Face cache (or find them there) and return the snapshot folder.

    Raises:
        CheckpointError: the hub cannot be reached (offline, ``HF_HUB_OFFLINE=1``) and the files
            are not cached, or the repository / revision / files do not exist.
    """
    # imported here: loading huggingface_hub takes ~0.4 s and only hub ids need it
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    repo, _, revision = hub_id.partition("@")
    try:
        config = Path(hf_hub_download(repo, CONFIG_FILE, revision=revision or None))
        for name in WEIGHTS_FILES:
            try:
                hf_hub_download(repo, name, revision=revision or None)
                break
            except EntryNotFoundError:  # not in the repository (or not cached when offline): try the next
                if name == WEIGHTS_FILES[-1]:
                    raise
    except (OSError, ValueError, EntryNotFoundError) as e:  # hub errors are OSErrors; bad ids ValueErrors
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"{hub_id!r} is not a local file or folder, and fetching it from the Hugging Face hub failed "
            f"({type(e).__name__}: {reason}). Without network access (or with HF_HUB_OFFLINE=1 and the model "
            f"not in the cache), download it on a machine that has access, e.g. `hf download {repo} "
            f"{CONFIG_FILE} {WEIGHTS_FILES[0]} --local-dir DIR` (older repositories have {WEIGHTS_FILES[1]} "
            f"instead), copy DIR here and pass the path of that folder") from None
    return config.parent


def hf_weights_file(folder: Union[str, os.PathLike]) -> Path:
    """The weights file of a transformers model folder (``model.safetensors`` before ``pytorch_model.bin``)."""
    folder = Path(folder)
    for name in WEIGHTS_FILES:
        if (folder / name).is_file():
            return folder / name
    sharded = sorted(p.name for p in folder.glob("*.index.json"))
    hint = (f" It holds {sharded[0]}: sharded weights are not supported (a DETR fits one file); re-save the "
            f"model with a larger max_shard_size" if sharded else "")
    raise CheckpointNotFoundError(f"{folder} has {CONFIG_FILE} but no weights file ({' or '.join(WEIGHTS_FILES)})."
                                  f"{hint}")


def read_hf_config(folder: Union[str, os.PathLike]) -> dict:
    """The parsed ``config.json`` of a transformers model folder."""
    path = Path(folder) / CONFIG_FILE
    try:
        config = json.loads(path.read_text())
    except ValueError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}). Download or save the model again") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} holds a {type(config).__name__}, not a transformers config")
    return config


def checkpoint_from_hf(hf_state: Mapping[str, Tensor], hf_config: Mapping, source: str = "config.json") -> dict:
    """A transformers DETR's weights and config.json as a checkpoint dict of this project.

    Returns:
        ``{"model": state dict with official-DETR keys, "config": Config.to_dict() with the model
        section from config.json, "categories": {class index: name} from id2label}``.

    Raises:
        CheckpointError: the config describes a model ours cannot represent (every such field is
            listed), or the weights do not map exactly onto it (every extra, missing or misshapen
            key is listed).
    """
    classifier = hf_state.get("class_labels_classifier.weight")
    categories = categories_from_hf(hf_config)
    num_classes = int(classifier.shape[0]) - 1 if classifier is not None else len(categories)
    model_cfg = model_config_from_hf(hf_config, num_classes, source)
    state, origin = hf_to_ours(hf_state, backbone_from_hf(hf_config, source).layout, source)
    check_fits(state, our_shapes(model_cfg), source, origin)
    return {"model": state, "config": Config(model=model_cfg).to_dict(), "categories": categories}


def save_hf_folder(out_dir: Union[str, os.PathLike], state_dict: Mapping[str, Tensor], model_config: ModelConfig,
                   categories: Mapping[int, str], backbone_layout: Optional[str] = None) -> Path:
    """Write a plain DETR as a transformers model folder (``config.json`` + ``model.safetensors``).

    ``transformers.DetrForObjectDetection.from_pretrained(out_dir)`` loads it and computes the
    same ``logits`` / ``pred_boxes`` as our ``pred_logits`` / ``pred_boxes``. By default the
    backbone is written as transformers' own ResNet, so loading needs ``transformers`` and
    nothing more; a DC5 model is written with a timm backbone (transformers dilates only those)
    and also needs ``timm``. A learned position embedding is stored where the installed
    transformers looks for it (4.x and 5 differ, and each loads only its own place; without
    transformers installed, 5's place).

    Args:
        state_dict: our model's state dict (official DETR keys).
        model_config: the config it was built from.
        categories: ``{class index: name}`` for ``id2label``.
        backbone_layout: ``"native"`` or ``"timm"`` to choose; None as above.

    Returns the folder.

    Raises:
        CheckpointError: iRPE, the ``tiny`` backbone or pre-norm (transformers' DETR has none of
            them), or weights that do not fit ``model_config``.
    """
    hf_config = hf_config_from_model(model_config, categories, backbone_layout)  # refuses what it cannot express
    check_fits(state_dict, our_shapes(model_config), "cannot write a Hugging Face folder")
    hf_state = ours_to_hf(state_dict, hf_backbone_for(model_config, backbone_layout).layout,
                          position_prefix=position_embedding_prefix())
    out = make_folder(out_dir, "output folder")
    save_safetensors(out / WEIGHTS_FILES[0], hf_state)
    atomic_write_text(out / CONFIG_FILE, json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
    return out

