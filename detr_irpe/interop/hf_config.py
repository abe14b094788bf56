"""Hugging Face ``transformers`` DETR ``config.json`` <-> :class:`~detr_irpe.config.ModelConfig`.

transformers' ``DetrForObjectDetection`` is the original DETR (post-norm transformer, no iRPE)
(its ``DetrForSegmentation`` official DETR's ``DETRsegm``, ``model.masks`` here) over a ResNet
taken either from timm (``use_timm_backbone``, the default of the hub's files) or from
transformers itself (a ``ResNetConfig`` as ``backbone_config``). Both layouts of config.json
are read: the one of transformers 4.x (``backbone``, ``use_timm_backbone``, ``dilation``,
``backbone_kwargs`` at the top level) and the one transformers 5 writes (a ``timm_backbone`` or
``resnet`` ``backbone_config``). A field that would make transformers compute something our
model does not is refused with a :class:`CheckpointError` naming it; fields that only matter
for training in transformers (``attention_dropout``, ``activation_dropout``, layer drop, init
scales) are not carried over.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Tuple

from ..config import ModelConfig
from ..errors import CheckpointError, UsageError
from ..models.backbone import RESNETS

# DetrConfig's defaults, for fields a config.json leaves out
_DETR_DEFAULTS = {
    "d_model": 256, "encoder_layers": 6, "decoder_layers": 6, "encoder_attention_heads": 8,
    "decoder_attention_heads": 8, "encoder_ffn_dim": 2048, "decoder_ffn_dim": 2048, "num_queries": 100,
    "dropout": 0.1, "activation_function": "relu", "position_embedding_type": "sine", "auxiliary_loss": False,
    "num_channels": 3, "dilation": False, "backbone": "resnet50", "use_timm_backbone": True,
    "class_cost": 1, "bbox_cost": 5, "giou_cost": 2, "bbox_loss_coefficient": 5, "giou_loss_coefficient": 2,
    "eos_coefficient": 0.1, "mask_loss_coefficient": 1, "dice_loss_coefficient": 1,
}
# ResNetConfig's defaults, for fields a backbone_config leaves out
_RESNET_DEFAULTS = {
    "num_channels": 3, "embedding_size": 64, "hidden_sizes": [256, 512, 1024, 2048], "depths": [3, 4, 6, 3],
    "layer_type": "bottleneck", "hidden_act": "relu", "downsample_in_first_stage": False,
    "downsample_in_bottleneck": False,
}
# (layer_type, depths, hidden_sizes) of transformers' ResNetConfig for each torchvision ResNet
RESNET_SHAPES = {
    "resnet18": ("basic", [2, 2, 2, 2], [64, 128, 256, 512]),
    "resnet34": ("basic", [3, 4, 6, 3], [64, 128, 256, 512]),
    "resnet50": ("bottleneck", [3, 4, 6, 3], [256, 512, 1024, 2048]),
    "resnet101": ("bottleneck", [3, 4, 23, 3], [256, 512, 1024, 2048]),
}
# DetrConfig field -> ModelConfig field, same meaning and value
_SAME = {
    "d_model": "hidden_dim", "encoder_layers": "enc_layers", "decoder_layers": "dec_layers",
    "encoder_attention_heads": "nheads", "encoder_ffn_dim": "dim_feedforward", "num_queries": "num_queries",
    "dropout": "dropout", "position_embedding_type": "position_embedding",
    "class_cost": "set_cost_class", "bbox_cost": "set_cost_bbox", "giou_cost": "set_cost_giou",
    "bbox_loss_coefficient": "bbox_loss_coef", "giou_loss_coefficient": "giou_loss_coef",
    "eos_coefficient": "eos_coef", "mask_loss_coefficient": "mask_loss_coef", "dice_loss_coefficient": "dice_loss_coef",
}
# matcher costs and loss weights that DetrConfig types as int (only training in transformers uses them)
_INT_TYPED = ("class_cost", "bbox_cost", "giou_cost", "bbox_loss_coefficient", "giou_loss_coefficient",
              "mask_loss_coefficient", "dice_loss_coefficient")
ARCHITECTURES = {"DetrForObjectDetection": False, "DetrForSegmentation": True}  # -> model.masks
STAGES = ["stage1", "stage2", "stage3", "stage4"]  # a native ResNet's outputs for the mask head (strides 4 to 32)
_TIMM_KWARGS = ("out_indices", "in_chans", "output_stride")  # backbone_kwargs that do not change the ResNet


@dataclass(frozen=True)
class HFBackbone:
    """The ResNet a transformers DETR config describes.

    Attributes:
        layout: ``"timm"`` (timm's module names, those of torchvision) or ``"native"``
            (transformers' ``ResNetModel``: ``embedder`` / ``encoder.stages``).
        name: ``resnet18`` / ``resnet34`` / ``resnet50`` / ``resnet101``.
        dilation: DC5, the last stage dilated instead of strided.
    """

    layout: str
    name: str
    dilation: bool


def _get(hf: Mapping, key: str):
    value = hf.get(key)
    return _DETR_DEFAULTS[key] if value is None else value


def _refuse(source: str, problems: List[str]) -> None:
    if problems:
        raise CheckpointError(f"{source}: this Hugging Face DETR cannot be represented by this project's model:\n  - "
                              + "\n  - ".join(problems))


def backbone_from_hf(hf: Mapping, source: str = "config.json") -> HFBackbone:
    """The backbone of a DETR config.json (either layout); refuses any but a torchvision-equivalent ResNet."""
    backbone, problems = _backbone(hf)
    _refuse(source, problems)
    return backbone


def _backbone(hf: Mapping) -> Tuple[Optional[HFBackbone], List[str]]:
    """The backbone and what keeps it from having an equivalent here (nothing when the list is empty)."""
    sub = hf.get("backbone_config")
    if isinstance(sub, Mapping) and sub.get("model_type") == "resnet":
        return _native_resnet(sub, hf)
    if isinstance(sub, Mapping) and sub.get("model_type") != "timm_backbone":
        return None, [f"backbone_config has model_type {sub.get('model_type')!r}; only ResNets (timm, or "
                      f"transformers' 'resnet') have an equivalent here"]
    if sub is None and not _get(hf, "use_timm_backbone"):
        return None, [f"use_timm_backbone is false but there is no backbone_config (backbone="
                      f"{hf.get('backbone')!r} is loaded by name): the backbone's architecture is not in the file"]
    return _timm_resnet(sub or {}, hf)


def _timm_resnet(sub: Mapping, hf: Mapping) -> Tuple[HFBackbone, List[str]]:
    """A timm backbone: transformers 5's ``timm_backbone`` sub-config, or 4.x's top-level fields."""
    kwargs = dict(hf.get("backbone_kwargs") or {})
    problems = [f"backbone_kwargs {k!r} changes the timm model; only {', '.join(_TIMM_KWARGS)} are understood"
                for k in kwargs if k not in _TIMM_KWARGS]
    name = str(sub.get("backbone") or _get(hf, "backbone"))
    arch = name.split(".")[0]  # timm names weights as "arch.tag", e.g. resnet50.a1_in1k
    if arch not in RESNETS:
        problems.append(f"timm backbone {name!r}: only {', '.join(RESNETS)} have an equivalent here")
    stride = sub.get("output_stride") or kwargs.get("output_stride") or (16 if _get(hf, "dilation") else 32)
    if stride not in (16, 32):
        problems.append(f"output stride {stride}: only 32 (plain) and 16 (DC5, dilation) exist here")
    out_indices = sub.get("out_indices") or kwargs.get("out_indices") or [1, 2, 3, 4]
    if list(out_indices)[-1] != 4:
        problems.append(f"out_indices {list(out_indices)}: DETR here reads the last stage (index 4)")
    channels = sub.get("num_channels") or kwargs.get("in_chans") or _get(hf, "num_channels")
    if channels != 3:
        problems.append(f"{channels} input channels: the backbone here takes RGB images (3)")
    return HFBackbone("timm", arch, stride == 16), problems


def _native_resnet(sub: Mapping, hf: Mapping) -> Tuple[HFBackbone, List[str]]:
    """transformers' own ResNet described by ``sub`` (a ResNetConfig dict), named as in torchvision."""
    fields = {k: (_RESNET_DEFAULTS[k] if sub.get(k) is None else sub[k]) for k in _RESNET_DEFAULTS}
    shape = (fields["layer_type"], list(fields["depths"]), list(fields["hidden_sizes"]))
    name = next((n for n, s in RESNET_SHAPES.items() if s == shape), None)
    problems = []
    if name is None:
        problems.append(f"transformers ResNet with layer_type={shape[0]!r}, depths={shape[1]}, hidden_sizes="
                        f"{shape[2]}: only the shapes of {', '.join(RESNETS)} have an equivalent here")
    for key, want in (("embedding_size", 64), ("hidden_act", "relu"), ("downsample_in_first_stage", False),
                      ("downsample_in_bottleneck", False), ("num_channels", 3)):
        if fields[key] != want:
            problems.append(f"backbone_config {key}={fields[key]!r}: the torchvision ResNet here has {want!r}")
    last = list(sub.get("out_features") or ["stage4"])[-1]
    if last != "stage4":
        problems.append(f"backbone_config out_features ends with {last!r}: DETR here reads the last stage (stage4)")
    if _get(hf, "dilation"):
        problems.append("dilation=true with transformers' own ResNet: transformers applies DC5 only to timm "
                        "backbones and runs this one undilated. Set dilation to false in config.json if that "
                        "is what the weights were trained with")
    return HFBackbone("native", name, False), problems


def _mask_backbone_problems(hf: Mapping) -> List[str]:
    """What keeps a ``DetrForSegmentation``'s backbone from giving its mask head the stride 4, 8 and 16
    features that ours reads (transformers takes its first three outputs)."""
    sub = hf.get("backbone_config")
    if isinstance(sub, Mapping) and sub.get("model_type") == "resnet":
        stages = list(sub.get("out_features") or ["stage4"])
        if stages != STAGES:
            return [f"backbone_config out_features {stages}: a DetrForSegmentation here reads {STAGES} (the mask "
                    f"head takes the stride 4, 8 and 16 features)"]
        return []
    sub = sub if isinstance(sub, Mapping) else {}
    indices = list(sub.get("out_indices") or (hf.get("backbone_kwargs") or {}).get("out_indices") or [1, 2, 3, 4])
    if indices != [1, 2, 3, 4]:
        return [f"out_indices {indices}: a DetrForSegmentation here reads [1, 2, 3, 4] (the mask head takes the "
                f"stride 4, 8 and 16 features)"]
    return []


def model_config_from_hf(hf: Mapping, num_classes: int, source: str = "config.json") -> ModelConfig:
    """The :class:`ModelConfig` of the model a DETR config.json describes (weights not included);
    ``DetrForSegmentation`` in ``architectures`` gives a segmentation model (``masks``).

    ``num_classes`` is the size of ``class_labels_classifier`` minus one ("no object"), which is
    transformers' ``num_labels``. ``aux_loss`` keeps our default: here it only adds training losses,
    whereas transformers' ``auxiliary_loss`` changes what the decoder computes (and is refused).

    Raises:
        CheckpointError: listing every field our model cannot represent.
    """
    problems = []
    if hf.get("model_type", "detr") != "detr":
        problems.append(f"model_type {hf.get('model_type')!r}: only 'detr' (DetrForObjectDetection) is "
                        f"the architecture of this project")
    architectures = hf.get("architectures") or ["DetrForObjectDetection"]
    known = [name for name in architectures if name in ARCHITECTURES]
    masks = bool(known) and ARCHITECTURES[known[0]]
    if not known:
        problems.append(f"architectures {architectures}: only DetrForObjectDetection (boxes and classes) and "
                        f"DetrForSegmentation (and masks) are supported, not the bare DetrModel")
    elif masks:
        problems += _mask_backbone_problems(hf)
    for key, want in (("activation_function", "relu"), ("num_channels", 3)):
        if _get(hf, key) != want:
            problems.append(f"{key}={_get(hf, key)!r}: our model has {want!r}")
    if _get(hf, "position_embedding_type") not in ("sine", "learned"):
        problems.append(f"position_embedding_type={_get(hf, 'position_embedding_type')!r}: only sine and learned")
    for enc, dec in (("encoder_attention_heads", "decoder_attention_heads"), ("encoder_ffn_dim", "decoder_ffn_dim")):
        if _get(hf, enc) != _get(hf, dec):
            problems.append(f"{enc}={_get(hf, enc)} differs from {dec}={_get(hf, dec)}: our model has one "
                            f"value for both")
    if _get(hf, "auxiliary_loss"):
        problems.append("auxiliary_loss=true: transformers then feeds each decoder layer the layer-normed output "
                        "of the previous one (and normalises the last one twice), which the original DETR and "
                        "this project do not; these weights would give other boxes here. If you accept that "
                        "(e.g. to fine-tune), set auxiliary_loss to false in config.json: transformers then "
                        "computes what this project computes")
    backbone, backbone_problems = _backbone(hf)
    _refuse(source, problems + backbone_problems)
    cfg = ModelConfig(backbone=backbone.name, backbone_weights="none", dilation=backbone.dilation,
                      num_classes=num_classes, rpe=None, pre_norm=False, masks=masks)
    for hf_key, ours in _SAME.items():
        value, kind = _get(hf, hf_key), type(getattr(cfg, ours))
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not (isinstance(value, str) if kind is str else number and (kind is float or float(value).is_integer())):
            _refuse(source, [f"{hf_key}={value!r} is not a valid {kind.__name__}"])
        setattr(cfg, ours, kind(value))
    return cfg


def categories_from_hf(hf: Mapping) -> Dict[int, str]:
    """``{class index: name}`` from ``id2label`` (empty if the file has none)."""
    return {int(k): str(v) for k, v in (hf.get("id2label") or {}).items()}


def hf_backbone_for(cfg: ModelConfig, layout: Optional[str] = None) -> HFBackbone:
    """The backbone written for ``cfg``.

    ``layout`` None picks transformers' own ResNet (``"native"``), which loads with transformers
    alone, except for DC5: transformers dilates only timm backbones, so a dilated model gets
    ``"timm"`` (and needs ``timm`` to load).

    Raises:
        UsageError: an unknown layout.
        CheckpointError: ``layout="native"`` for a DC5 model.
    """
    layout = layout or ("timm" if cfg.dilation else "native")
    if layout not in ("timm", "native"):
        raise UsageError(f"unknown backbone layout {layout!r}: choose 'native' (transformers' ResNet) or 'timm'")
    if layout == "native" and cfg.dilation:
        raise CheckpointError("cannot write a DC5 (dilated) model with transformers' own ResNet: transformers "
                              "dilates only timm backbones. Write it with the timm layout")
    return HFBackbone(layout, cfg.backbone, cfg.dilation)


def hf_config_from_model(cfg: ModelConfig, categories: Mapping[int, str], backbone_layout: Optional[str] = None
                         ) -> dict:
    """The config.json of transformers' ``DetrForObjectDetection`` (``DetrForSegmentation`` for a model
    with masks) computing what ``cfg``'s model computes.

    ``backbone_layout`` as in :func:`hf_backbone_for`. ``id2label`` covers every class index
    (``num_labels`` is its length); indices without a category get ``"N/A"``, as the hub's COCO
    models have. ``attention_dropout`` and ``activation_dropout`` are set to our single
    ``dropout`` (ours drops there too). Matcher costs and loss weights are written when
    transformers can take them (it types all but ``eos_coefficient`` as int); a fractional one is
    left at transformers' default, which only its training uses.

    Raises:
        CheckpointError: the model has no transformers equivalent (iRPE, the ``tiny`` backbone,
            pre-norm, a mask head whose group norms have fewer than DETR's 8 groups), or a category
            id is not a class index.
    """
    problems = []
    if cfg.masks:
        widths = [cfg.hidden_dim + cfg.nheads] + [cfg.hidden_dim // f for f in (2, 4, 8, 16)]
        if any(width % 8 for width in widths):
            problems.append(f"its mask head has group norms of fewer than 8 groups (channels {widths}, hidden_dim "
                            f"{cfg.hidden_dim}, nheads {cfg.nheads}): transformers' DetrForSegmentation normalises "
                            f"them in 8 groups, which needs hidden_dim + nheads and hidden_dim / 16 divisible by 8")
    if cfg.rpe:
        problems.append(f"it uses iRPE (model.rpe={cfg.rpe}): transformers' DETR has no relative position "
                        f"encoding, so the learned iRPE tables would have no place in its weights and the model "
                        f"would compute other boxes without them. Keep it in this project's format "
                        f"(--to ours or --to safetensors)")
    if cfg.backbone not in RESNETS:
        problems.append(f"its backbone {cfg.backbone!r} has no counterpart in transformers, whose DETR takes a "
                        f"ResNet ({', '.join(RESNETS)}) from timm or transformers")
    if cfg.pre_norm:
        problems.append("it is pre-norm (model.pre_norm=true): transformers' DETR has only the post-norm transformer")
    outside = sorted(k for k in categories if not 0 <= int(k) < cfg.num_classes)
    if outside:
        problems.append(f"category ids {outside[:10]} are not class indices of its {cfg.num_classes}-class head")
    if problems:
        raise CheckpointError("cannot write this model as a Hugging Face transformers DETR:\n  - "
                              + "\n  - ".join(problems))
    id2label = {str(i): str(categories.get(i, "N/A")) for i in range(cfg.num_classes)}
    hf = {
        "model_type": "detr", "architectures": ["DetrForSegmentation" if cfg.masks else "DetrForObjectDetection"],
        "d_model": cfg.hidden_dim, "encoder_layers": cfg.enc_layers, "decoder_layers": cfg.dec_layers,
        "encoder_attention_heads": cfg.nheads, "decoder_attention_heads": cfg.nheads,
        "encoder_ffn_dim": cfg.dim_feedforward, "decoder_ffn_dim": cfg.dim_feedforward,
        "num_queries": cfg.num_queries, "dropout": cfg.dropout, "attention_dropout": cfg.dropout,
        "activation_dropout": cfg.dropout, "activation_function": "relu",
        "position_embedding_type": cfg.position_embedding, "auxiliary_loss": False, "num_channels": 3,
        "dilation": cfg.dilation, "use_pretrained_backbone": False,
        "id2label": id2label, "label2id": {name: int(i) for i, name in id2label.items()},
    }
    for hf_key, ours in _SAME.items():
        hf.setdefault(hf_key, getattr(cfg, ours))
    for hf_key in _INT_TYPED:  # transformers 5 validates these as int: a fraction would not load
        value = hf.pop(hf_key)
        if float(value).is_integer():
            hf[hf_key] = int(value)
    if hf_backbone_for(cfg, backbone_layout).layout == "timm":
        hf.update(use_timm_backbone=True, backbone=cfg.backbone, backbone_config=None)
    else:
        layer_type, depths, hidden_sizes = RESNET_SHAPES[cfg.backbone]
        hf.update(use_timm_backbone=False, backbone=None, backbone_config=dict(
            _RESNET_DEFAULTS, model_type="resnet", layer_type=layer_type, depths=depths, hidden_sizes=hidden_sizes,
            out_features=STAGES if cfg.masks else ["stage4"]))
    return hf
