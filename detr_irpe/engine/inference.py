"""Turning a checkpoint file (ours, official DETR or the iRPE model zoo) into a ready model."""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Dict, Optional, Sequence

from torch import nn

from ..config import Config, apply_overrides, config_from_dict, load_config, validate
from ..models import build_detr
from .checkpoint import load_checkpoint_file, load_model_weights, state_dict_from_checkpoint

# fields of the official DETR / iRPE-DETR argparse.Namespace that map onto ModelConfig
_ARGS_TO_MODEL = {
    "backbone": "backbone", "dilation": "dilation", "position_embedding": "position_embedding",
    "hidden_dim": "hidden_dim", "nheads": "nheads", "enc_layers": "enc_layers", "dec_layers": "dec_layers",
    "dim_feedforward": "dim_feedforward", "dropout": "dropout", "pre_norm": "pre_norm",
    "num_queries": "num_queries", "enc_rpe2d": "rpe",
}


@dataclass
class Detector:
    model: nn.Module
    postprocessor: nn.Module
    config: Config
    categories: Dict[int, str]


def config_for_checkpoint(ckpt: dict, config_path: Optional[str] = None, overrides: Sequence[str] = ()) -> Config:
    """The config a checkpoint was trained with, then ``config_path`` and ``overrides`` on top.

    Our checkpoints store it under ``config``; official DETR and iRPE-DETR files store an
    ``argparse.Namespace`` under ``args``. ``num_classes`` / ``num_queries`` are read from the
    weights' shapes, so an official COCO checkpoint needs no config at all.
    """
    if config_path is not None:
        cfg = load_config(config_path)
    elif isinstance(ckpt.get("config"), dict):
        cfg = config_from_dict(ckpt["config"])
    else:
        cfg = Config()
        args = ckpt.get("args")
        if isinstance(args, argparse.Namespace):
            for src, dst in _ARGS_TO_MODEL.items():
                if hasattr(args, src):
                    value = getattr(args, src)
                    setattr(cfg.model, dst, (value or None) if dst == "rpe" else value)
    state = state_dict_from_checkpoint(ckpt)
    if "class_embed.weight" in state:
        cfg.model.num_classes = int(state["class_embed.weight"].shape[0]) - 1
    if "query_embed.weight" in state:
        cfg.model.num_queries = int(state["query_embed.weight"].shape[0])
    cfg.model.backbone_weights = "none"  # the checkpoint holds the backbone
    apply_overrides(cfg, overrides)
    return validate(cfg)


def load_detector(checkpoint: str, config_path: Optional[str] = None, overrides: Sequence[str] = (),
                  device: str = "cpu") -> Detector:
    """Build the model a checkpoint describes and load its weights (``strict=True``)."""
    ckpt = load_checkpoint_file(checkpoint)
    cfg = config_for_checkpoint(ckpt, config_path, overrides)
    model, _, postprocessor = build_detr(cfg.model)
    load_model_weights(model, state_dict_from_checkpoint(ckpt), strict=True, source=str(checkpoint))
    model.to(device).eval()
    categories = ckpt.get("categories") or {}
    return Detector(model, postprocessor, cfg, {int(k): str(v) for k, v in categories.items()})
