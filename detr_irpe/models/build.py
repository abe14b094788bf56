"""``build_detr``: model, criterion and post-processor from a :class:`ModelConfig`."""
from __future__ import annotations

import dataclasses
import difflib
from typing import Tuple, Union

from ..config import Config, ConfigError, ModelConfig, validate
from .backbone import Joiner, build_backbone
from .criterion import SetCriterion, detr_weight_dict
from .detr import DETR
from .matcher import HungarianMatcher
from .position_encoding import build_position_encoding
from .postprocess import PostProcess
from .segmentation import DETRsegm
from .transformer import Transformer


def resolve_model_config(config: Union[None, ModelConfig, Config] = None, **overrides) -> ModelConfig:
    """A validated copy of ``config`` (or the defaults) with keyword ``overrides`` applied.

    Raises:
        TypeError: an override is not a ``ModelConfig`` field (the message names the closest one).
        detr_irpe.config.ConfigError: a value is out of range.
    """
    if config is None:
        config = ModelConfig()
    elif isinstance(config, Config):
        config = config.model
    elif not isinstance(config, ModelConfig):
        raise TypeError(f"config must be a ModelConfig, a Config or None, got {type(config).__name__}")
    fields = [f.name for f in dataclasses.fields(ModelConfig)]
    for key in overrides:
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1, cutoff=0.5)
            hint = f" Did you mean '{close[0]}'?" if close else f" Valid fields: {', '.join(fields)}"
            raise TypeError(f"build_detr got an unknown model option '{key}'.{hint}")
    config = dataclasses.replace(config, **overrides)
    if isinstance(config.rpe, str) and config.rpe.strip().lower() in ("", "none"):
        config.rpe = None
    if config.num_classes is None:
        raise ConfigError("model.num_classes is None: set it to the number of classes (COCO: 91, the largest "
                         "category id + 1); the training script fills it in from the annotation file")
    validate(Config(model=config))
    return config


def build_detr(config: Union[None, ModelConfig, Config] = None,
               **overrides) -> Tuple[Union[DETR, DETRsegm], SetCriterion, PostProcess]:
    """Build the detector, its training criterion and its post-processor.

    With ``masks=True`` the detector is a :class:`~detr_irpe.models.segmentation.DETRsegm` (DETR
    with its mask head), the criterion adds the mask losses and the post-processor the masks.

    Args:
        config: a :class:`ModelConfig`, a full :class:`Config` (its ``model`` is used) or None
            for the defaults (DETR-R50, ImageNet backbone weights).
        **overrides: ``ModelConfig`` fields, e.g. ``backbone="resnet18", hidden_dim=64``.

    Returns:
        ``(model, criterion, postprocessor)``, each usable on its own.
    """
    cfg = resolve_model_config(config, **overrides)
    backbone = Joiner(
        build_backbone(cfg.backbone, cfg.backbone_weights, cfg.train_backbone, cfg.dilation),
        build_position_encoding(cfg.position_embedding, cfg.hidden_dim),
    )
    transformer = Transformer(
        d_model=cfg.hidden_dim, nhead=cfg.nheads, num_encoder_layers=cfg.enc_layers,
        num_decoder_layers=cfg.dec_layers, dim_feedforward=cfg.dim_feedforward, dropout=cfg.dropout,
        pre_norm=cfg.pre_norm, rpe=cfg.rpe, rpe_impl=cfg.rpe_impl,
    )
    model = DETR(backbone, transformer, cfg.num_classes, cfg.num_queries, aux_loss=cfg.aux_loss,
                 query_groups=cfg.query_groups)
    if cfg.masks:
        model = DETRsegm(model)
    matcher = HungarianMatcher(cfg.set_cost_class, cfg.set_cost_bbox, cfg.set_cost_giou)
    num_aux = cfg.dec_layers - 1 if cfg.aux_loss else 0
    weight_dict = detr_weight_dict(cfg.ce_loss_coef, cfg.bbox_loss_coef, cfg.giou_loss_coef, num_aux,
                                   masks=cfg.masks, mask_loss_coef=cfg.mask_loss_coef,
                                   dice_loss_coef=cfg.dice_loss_coef)
    criterion = SetCriterion(cfg.num_classes, matcher, weight_dict, eos_coef=cfg.eos_coef)
    return model, criterion, PostProcess()
