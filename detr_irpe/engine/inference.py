"""A checkpoint file (ours, official DETR or the iRPE model zoo) turned into a ready model, and that
model run on images held in memory."""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch
from torch import Tensor, nn

from ..config import Config, apply_overrides, config_from_dict, load_config, validate
from ..data.transforms import model_input_transform
from ..models import build_detr
from ..structures import pad_images
from .checkpoint import load_checkpoint_file, load_model_weights, state_dict_from_checkpoint

# fields of the official DETR / iRPE-DETR argparse.Namespace that map onto ModelConfig
_ARGS_TO_MODEL = {
    "backbone": "backbone", "dilation": "dilation", "position_embedding": "position_embedding",
    "hidden_dim": "hidden_dim", "nheads": "nheads", "enc_layers": "enc_layers", "dec_layers": "dec_layers",
    "dim_feedforward": "dim_feedforward", "dropout": "dropout", "pre_norm": "pre_norm",
    "num_queries": "num_queries", "enc_rpe2d": "rpe", "masks": "masks",
}
SEGMENTATION_KEYS = ("bbox_attention.", "mask_head.")  # a DETRsegm state dict (its detector under "detr.")


TRAINING_ONLY = ("group_query_embed.",)  # state-dict prefixes inference leaves out


@dataclass
class LoadedDetector:
    """A model built from a checkpoint and ready for inference, with what it was trained on.

    Attributes:
        model: the DETR, in eval mode, on its device.
        postprocessor: turns its outputs into absolute boxes, scores and labels.
        config: the checkpoint's config (the ``data`` section gives the evaluation resize).
        categories: class id -> name (empty when the checkpoint stores none).
    """

    model: nn.Module
    postprocessor: nn.Module
    config: Config
    categories: Dict[int, str]
    batched_backbone: bool = False  # see detect()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def detect(self, images: Sequence[Tensor], batch_size: Optional[int] = None) -> List[Dict[str, Tensor]]:
        """Every query's detection for each ``(3, H, W)`` uint8 RGB image.

        Images are resized like evaluation images (``data.eval_size`` / ``data.max_size``) and run
        ``batch_size`` at a time (default: all at once), padded. The CNN sees each image unpadded,
        so an image's detections do not depend on what it is batched with, unless
        ``batched_backbone`` (the padded batch, as training does).

        Returns:
            per image ``{"scores": (Q,), "labels": (Q,), "boxes": (Q, 4)}`` on the CPU, boxes
            absolute ``(x1, y1, x2, y2)`` in the original image's pixels.
        """
        transform = model_input_transform(self.config.data)
        device, step = self.device, max(batch_size or len(images), 1)
        self.model.eval()
        results: List[Dict[str, Tensor]] = []
        for start in range(0, len(images), step):
            chunk = images[start:start + step]
            batch, mask = pad_images([transform(image) for image in chunk])
            outputs = self.model(batch.to(device), mask.to(device), batched_backbone=self.batched_backbone)
            sizes = torch.tensor([list(image.shape[-2:]) for image in chunk], device=device)
            results += [{k: v.cpu() for k, v in r.items()} for r in self.postprocessor(outputs, sizes)]
        return results


def config_for_checkpoint(ckpt: dict, config_path: Optional[str] = None, overrides: Sequence[str] = ()) -> Config:
    """The config a checkpoint was trained with, then ``config_path`` and ``overrides`` on top.

    Our checkpoints store it under ``config``; official DETR and iRPE-DETR files store an
    ``argparse.Namespace`` under ``args``. ``num_classes`` / ``num_queries`` are read from the
    weights' shapes, so an official COCO checkpoint needs no config at all; so is ``masks``
    (a segmentation model: ``bbox_attention.*`` / ``mask_head.*`` beside ``detr.*``), which
    ``args.masks`` says too. The config is for inference: one group of queries
    (``model.query_groups = 1``), and the attention computed the way this machine does best
    (``model.rpe_impl = "auto"``; an override may choose another).
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
    if any(k.startswith(SEGMENTATION_KEYS) for k in state):
        cfg.model.masks = True
    detr = "detr." if cfg.model.masks else ""
    if detr + "class_embed.weight" in state:
        cfg.model.num_classes = int(state[detr + "class_embed.weight"].shape[0]) - 1
    if detr + "query_embed.weight" in state:
        cfg.model.num_queries = int(state[detr + "query_embed.weight"].shape[0])
    cfg.model.backbone_weights = "none"  # the checkpoint holds the backbone
    cfg.model.query_groups = 1  # extra query groups only train (see inference_state_dict)
    cfg.model.rpe_impl = "auto"  # how the attention runs belongs to this machine, not to the weights
    apply_overrides(cfg, overrides)
    return validate(cfg)


def inference_state_dict(state: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """``state`` without what only training uses: the extra query groups of Group DETR
    (``group_query_embed``), which inference never runs. What is left is a DETR state dict."""
    return {k: v for k, v in state.items() if not k.startswith(TRAINING_ONLY)}


def load_detector(checkpoint: str, config_path: Optional[str] = None, overrides: Sequence[str] = (),
                  device: str = "cpu") -> LoadedDetector:
    """Build the model a checkpoint describes and load its weights (``strict=True``)."""
    ckpt = load_checkpoint_file(checkpoint)
    cfg = config_for_checkpoint(ckpt, config_path, overrides)
    model, _, postprocessor = build_detr(cfg.model)
    load_model_weights(model, inference_state_dict(state_dict_from_checkpoint(ckpt)), strict=True,
                       source=str(checkpoint))
    model.to(device).eval()
    categories = ckpt.get("categories") or {}
    return LoadedDetector(model, postprocessor, cfg, {int(k): str(v) for k, v in categories.items()})
