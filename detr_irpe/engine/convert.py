"""Converting a checkpoint between formats: ours (``.pth``), ``.safetensors``, a Hugging Face folder.

The source is anything :func:`~detr_irpe.engine.checkpoint.load_checkpoint_file` reads (ours,
official DETR / iRPE-DETR files, ``.safetensors``, a transformers folder or hub id, a URL). Only
the model is converted, as inference uses it: its weights, its config and the category names;
optimizer and scheduler state, and the extra query groups of Group DETR training, are left behind.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

import torch

from ..errors import UsageError
from ..files import refuse_existing, refuse_inputs
from ..interop import HF_FOLDER_FILES, save_hf_folder, save_safetensors
from ..models import build_detr
from .checkpoint import check_model_weights, load_checkpoint_file, state_dict_from_checkpoint
from .inference import config_for_checkpoint, inference_state_dict
from .state import atomic_save

FORMATS = ("hf", "ours", "safetensors")


def convert_checkpoint(src: Union[str, os.PathLike], out: Union[str, os.PathLike], to: str,
                       hf_backbone: Optional[str] = None, overwrite: bool = False) -> Path:
    """Read the checkpoint ``src`` and write its model to ``out`` in format ``to``.

    Args:
        src: a checkpoint path, folder, hub id or URL.
        out: the file (``ours``: a ``.pth`` dict with ``model`` / ``config`` / ``categories``;
            ``safetensors``: a ``.safetensors`` file with the config and categories in its
            metadata) or, for ``hf``, the folder to write (``config.json`` + ``model.safetensors``,
            loadable with ``transformers.DetrForObjectDetection.from_pretrained``).
        to: ``"hf"``, ``"ours"`` or ``"safetensors"``.
        hf_backbone: for ``hf``, ``"native"`` (transformers' own ResNet; loads without timm) or
            ``"timm"``; None: native, except DC5, which transformers supports only with timm.
        overwrite: replace an existing ``out`` (never ``src`` itself).

    Returns the path written.

    Raises:
        UsageError: an unknown ``to``, or an output name whose suffix would be read as another format.
        OutputExistsError: ``out`` exists (without ``overwrite``) or is ``src``.
        CheckpointError: ``src`` cannot be read or does not fit the model its config describes;
            ``to="hf"`` for a model transformers cannot express (iRPE, the ``tiny`` backbone,
            pre-norm).
    """
    if to not in FORMATS:
        raise UsageError(f"unknown target format {to!r}; choose one of {', '.join(FORMATS)}")
    out = Path(out)
    if to != "hf" and (out.suffix == ".safetensors") != (to == "safetensors"):
        raise UsageError(f"{out}: files ending in .safetensors are read as safetensors, others as .pth files; "
                         f"name the output of --to {to} " + ("*.safetensors" if to == "safetensors" else "e.g. *.pth"))
    written = [out / name for name in HF_FOLDER_FILES] if to == "hf" else [out]
    refuse_inputs(written, [src], "choose another output path")
    if not overwrite:
        refuse_existing(written, "pass --overwrite to replace it, or choose another output path")
    ckpt = load_checkpoint_file(src)
    cfg = config_for_checkpoint(ckpt)
    state = inference_state_dict(state_dict_from_checkpoint(ckpt))
    with torch.device("meta"):
        model, _, _ = build_detr(cfg.model)
    check_model_weights(model, state, source=str(src))
    state = {k: state[k] for k in model.state_dict()}  # leaves out only batch norm counters no model uses
    categories = {int(k): str(v) for k, v in (ckpt.get("categories") or {}).items()}
    if to == "hf":
        return save_hf_folder(out, state, cfg.model, categories, backbone_layout=hf_backbone, data_config=cfg.data)
    if to == "safetensors":
        return save_safetensors(out, state, cfg.to_dict(), categories)
    atomic_save({"model": state, "config": cfg.to_dict(), "categories": categories}, out)
    return out
