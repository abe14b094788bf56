"""Typed configuration: dataclass defaults <- YAML file <- ``key=value`` overrides.

A config has three sections, ``model``, ``data`` and ``train``. YAML files mirror them::

    model:
      backbone: resnet50
      rpe: rpe-2.0-product-ctx-1-k
    train:
      epochs: 150

Command-line overrides use dotted keys (``train.lr=2e-4``) or, when a name is unique
across sections, the bare name (``lr=2e-4``). Values are parsed as YAML scalars and
checked against the field's type. Any unknown key is an error naming the closest
valid one.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from .errors import DetrIrpeError
from .files import atomic_write_text
from .irpe import RPE_IMPLS, parse_rpe_spec


class ConfigError(DetrIrpeError, ValueError):
    """A config file or override is malformed: names the key, the value and what is valid."""


@dataclass
class ModelConfig:
    """Architecture, matcher costs and loss weights (the arguments of ``build_detr``)."""

    backbone: str = "resnet50"  # resnet18 | resnet34 | resnet50 | resnet101 | tiny
    backbone_weights: str = "imagenet"  # imagenet | none | path to a torchvision-format state dict
    train_backbone: bool = True  # False freezes the whole backbone (DETR's lr_backbone=0)
    dilation: bool = False  # DC5: dilate the last stage (stride 16)
    position_embedding: str = "sine"  # sine | learned
    hidden_dim: int = 256
    nheads: int = 8
    enc_layers: int = 6
    dec_layers: int = 6
    dim_feedforward: int = 2048
    dropout: float = 0.1
    pre_norm: bool = False
    num_queries: int = 100
    num_classes: Optional[int] = 91  # None: read from the training annotation file
    rpe: Optional[str] = None  # iRPE spec of the encoder, e.g. rpe-2.0-product-ctx-1-k; None = plain DETR
    # how the iRPE attention runs: auto (CPU: the compiled kernel; GPU: SDPA with the iRPE logits as a
    # mask) | native | chunked | sdpa | triton (the fused GPU kernel; opt-in until measured on a GPU)
    rpe_impl: str = "auto"
    aux_loss: bool = True
    # Group DETR: in training, this many groups of num_queries queries, each matched one-to-one to
    # the targets and hidden from the others in decoder self-attention; inference uses the first
    # group only, so the model stays DETR. 1 = DETR (the COCO configs).
    query_groups: int = 1
    # Hungarian matcher costs
    set_cost_class: float = 1.0
    set_cost_bbox: float = 5.0
    set_cost_giou: float = 2.0
    # loss weights
    ce_loss_coef: float = 1.0
    bbox_loss_coef: float = 5.0
    giou_loss_coef: float = 2.0
    eos_coef: float = 0.1  # weight of the "no object" class in the cross-entropy
    # instance segmentation (DETR's mask head: attention maps of the last decoder layer over the
    # encoder memory, an FPN-style conv head over the backbone's stride 4/8/16 features)
    masks: bool = False
    mask_loss_coef: float = 1.0  # sigmoid focal loss of the matched masks
    dice_loss_coef: float = 1.0  # DICE loss of the matched masks


@dataclass
class DataConfig:
    """Where the COCO-format data lives and how it is augmented."""

    root: str = "data/coco"
    # coco: COCO detection json (instances_*.json) | coco_panoptic: COCO panoptic json (panoptic_*.json,
    # *_annotations) with its PNG folders (*_panoptic_folder): with model.masks evaluated by PQ, without
    # it (DETR's first stage, the detector) by box AP on the segments' boxes
    dataset: str = "coco"
    train_images: str = "train2017"  # relative to root unless absolute
    train_annotations: str = "annotations/instances_train2017.json"
    val_images: str = "val2017"
    val_annotations: str = "annotations/instances_val2017.json"
    train_panoptic_folder: str = "panoptic_train2017"  # coco_panoptic: the PNGs of train_annotations
    val_panoptic_folder: str = "panoptic_val2017"
    train_scales: list = field(default_factory=lambda: list(range(480, 801, 32)))
    max_size: int = 1333
    eval_size: int = 800
    crop_resize: list = field(default_factory=lambda: [400, 500, 600])
    crop_min: int = 384
    crop_max: int = 600
    hflip: bool = True
    augment: bool = True  # False: training images get the evaluation transform
    num_workers: int = 2
    cache_images: bool = False  # decode each image once and keep it in memory (small datasets)


@dataclass
class EMAConfig:
    """``train.ema``: an exponential moving average of the weights, updated after every optimizer
    step with decay ``decay * (1 - exp(-updates / warmup_steps))`` (RT-DETR's ModelEMA ramp; 0
    warmup steps: ``decay`` from the first update). Validation, the best checkpoint and inference
    use the averaged weights."""

    decay: float = 0.9999
    warmup_steps: int = 2000


ACTIVATION_CHECKPOINTING = ("backbone", "encoder", "decoder")  # the parts train.activation_checkpointing names
LOSS_NORMALIZATIONS = ("global", "official")
DATASETS = ("coco", "coco_panoptic")  # the values of data.dataset


@dataclass
class TrainConfig:
    """Optimisation, schedule, checkpoints and logging."""

    output_dir: str = "outputs/run"
    epochs: int = 150
    batch_size: int = 2  # per process and forward pass
    # micro-batches of batch_size per optimizer step (gradient accumulation): one step equals one batch
    # of accumulate x batch_size images; epochs, the LR schedule, logging and max_iters_per_epoch count steps
    accumulate: int = 1
    # what the losses are divided by when a step spans micro-batches or processes. global: counts over
    # the step's whole batch (every process, every micro-batch), so processes x micro-batches x images
    # equals one batch of them all, every loss. official: DETR's under DDP, the box losses over all
    # processes' boxes, the classification loss a weighted mean over each process's own images (the default:
    # official DETR's training step, exactly; both are exact across micro-batches of one process)
    loss_normalization: str = "official"
    batched_backbone: bool = True  # False: the CNN sees each image unpadded (slower; see README)
    activation_checkpointing: list = field(default_factory=list)  # any of backbone, encoder, decoder
    ema: Optional[EMAConfig] = None  # e.g. {decay: 0.9999, warmup_steps: 2000}; null: none (DETR)
    lr: float = 1e-4
    lr_backbone: float = 1e-5
    weight_decay: float = 1e-4
    lr_drop: int = 100  # epoch at which the learning rate is divided by 10 (lr_schedule=step)
    lr_schedule: str = "step"  # step: divide by 10 at epoch lr_drop (DETR) | cosine: per-iteration decay to 0
    warmup_iters: int = 0  # linear learning-rate warmup over the first iterations (0 = none)
    max_minutes: Optional[float] = None  # wall-clock budget of the training loop; when spent, it stops and evaluates
    clip_max_norm: float = 0.1
    eval_every: int = 1  # epochs between evaluations; 0 = only at the end
    seed: int = 42
    amp: str = "none"  # none | bf16 | fp16
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    pretrained: Optional[str] = None  # checkpoint to start from (fine-tuning)
    # a detection checkpoint loaded into the detector and frozen: only the mask head trains
    # (model.masks; the second stage of DETR's segmentation recipe)
    frozen_weights: Optional[str] = None
    max_iters_per_epoch: Optional[int] = None  # cap for quick runs
    keep_last: int = 3  # rolling checkpoints kept besides checkpoint.pth and the best
    save_safetensors: bool = False  # also the model weights as <checkpoint>.safetensors beside each .pth
    deterministic: bool = False
    skip_nonfinite: bool = False  # skip a batch whose loss is NaN/inf instead of stopping
    log_every: int = 20
    tensorboard: bool = False  # also write TensorBoard event files under output_dir/tensorboard
    tensorboard_images: int = 4  # validation images drawn into TensorBoard at each evaluation
    # pretraining of a backbone without ImageNet weights (tiny) on the training split's
    # image-level labels, before DETR trains (detr_irpe.engine.pretrain; the demo does it)
    pretrain_iterations: int = 0  # 0: none
    pretrain_batch_size: int = 32
    pretrain_lr: float = 2e-3  # AdamW
    pretrain_target: str = "image"  # image: which categories an image holds | cells: which cover each feature cell


# what computes COCO AP (detr_irpe.evaluation.backends): auto takes the fastest installed one that is
# bit-identical to pycocotools, the reference
EVAL_BACKENDS = ("auto", "pycocotools", "faster-coco-eval", "ultrafast")


@dataclass
class EvalConfig:
    """COCO evaluation: which library computes it, and the pictures that explain the AP."""

    backend: str = "auto"  # auto | pycocotools | faster-coco-eval | ultrafast
    pictures: bool = True  # per-class AP, PR curves, confusion matrix, sizes: PNGs (and TensorBoard) per evaluation
    confusion_threshold: float = 0.5  # minimum score of a detection counted in the confusion matrix


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


SECTIONS = ("model", "data", "train", "eval")
CONFIG_DIR = Path(__file__).with_name("configs")  # the YAML configs shipped with the package


def _closest(name: str, choices) -> str:
    match = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.5)
    return f" Did you mean '{match[0]}'?" if match else ""


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def _coerce(value: Any, tp, where: str) -> Any:
    """Check ``value`` against the annotation ``tp`` (int, float, str, bool, list, Optional[...], or a
    dataclass such as :class:`EMAConfig`, given as a mapping of its fields)."""
    if isinstance(tp, str):  # postponed annotations
        tp = eval(tp, {**vars(typing), **globals()}, {})  # noqa: S307 - annotations of this module only
    origin = typing.get_origin(tp)
    if origin in (Union, getattr(types, "UnionType", Union)):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        if isinstance(value, str) and value.lower() in ("none", "null", "~") and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        number = None
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            try:
                number = float(value)
            except ValueError:
                pass
            except OverflowError:  # an integer beyond the range of a float
                number = float("inf")
        if number is None:
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        if not abs(number) < float("inf"):  # refuses nan too: it fails every comparison
            raise ConfigError(f"{where}: expected a finite number, got {value!r}")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    if tp is list or origin is list:
        if isinstance(value, (list, tuple)):
            return list(value)
        raise ConfigError(f"{where}: expected a list like [1, 2], got {value!r}")
    if dataclasses.is_dataclass(tp):
        return _coerce_mapping(value, tp, where)
    return value


def _coerce_mapping(value: Any, tp, where: str) -> Any:
    """A ``tp`` dataclass from a mapping of some of its fields (the others keep their defaults)."""
    if isinstance(value, tp):
        return value
    fields = {f.name: f for f in dataclasses.fields(tp)}
    example = "{" + ", ".join(f"{name}: {f.default}" for name, f in fields.items()) + "}"
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a mapping like {example} or null, got {value!r}")
    for key in value:
        if key not in fields:
            raise ConfigError(f"{where}: unknown key '{key}'.{_closest(str(key), fields)} "
                              f"Valid keys: {', '.join(fields)}")
    return tp(**{key: _coerce(v, fields[key].type, f"{where}.{key}") for key, v in value.items()})


def _set(section_obj, section: str, key: str, value: Any) -> None:
    fields = {f.name: f for f in dataclasses.fields(section_obj)}
    if key not in fields:
        raise ConfigError(f"unknown config key '{section}.{key}'.{_closest(key, fields)} "
                          f"Valid keys of '{section}': {', '.join(fields)}")
    setattr(section_obj, key, _coerce(value, fields[key].type, f"{section}.{key}"))


def merge_dict(cfg: Config, data: dict, source: str = "config") -> Config:
    """Apply a nested ``{section: {key: value}}`` mapping onto ``cfg`` (in place)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping with sections {SECTIONS}, got {type(data).__name__}")
    for section, values in data.items():
        if section not in SECTIONS:
            raise ConfigError(f"{source}: unknown section '{section}'.{_closest(str(section), SECTIONS)} "
                              f"Valid sections: {', '.join(SECTIONS)}")
        if values is None:
            continue
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: section '{section}' must be a mapping, got {values!r}")
        for key, value in values.items():
            try:
                _set(getattr(cfg, section), section, str(key), value)
            except ConfigError as e:
                raise ConfigError(f"{source}: {e}") from None
    return cfg


def shipped_configs() -> list:
    """Names of the configs shipped inside the package (``detr_r50``, ``demo``, ...)."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def resolve_config_path(path: Union[str, Path]) -> Path:
    """``path`` if it is a file; else the shipped config it names (``detr_r50``, ``detr_r50.yaml``
    or ``configs/detr_r50.yaml``), so that the commands find the configs from any folder and in a
    non-editable install."""
    given = Path(path)
    if given.is_file():
        return given
    name = given.name if given.suffix in (".yaml", ".yml") else given.name + ".yaml"
    shipped = CONFIG_DIR / name
    if shipped.is_file() and (len(given.parts) == 1 or given.parent.name == "configs"):
        return shipped
    raise ConfigError(f"config file not found: {path}. Pass an existing YAML file or a shipped config: "
                      f"{', '.join(shipped_configs())}")


def load_config(path: Optional[Union[str, Path]] = None, overrides: typing.Sequence[str] = ()) -> Config:
    """Defaults, then the YAML file at ``path`` (if any), then ``key=value`` overrides; validated."""
    cfg = Config()
    if path is not None:
        path = resolve_config_path(path)
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        merge_dict(cfg, data or {}, source=str(path))
    apply_overrides(cfg, overrides)
    validate(cfg)
    return cfg


def _owner_sections(key: str) -> list:
    return [s for s in SECTIONS if key in {f.name for f in dataclasses.fields(getattr(Config(), s))}]


def apply_overrides(cfg: Config, overrides: typing.Sequence[str]) -> Config:
    """Apply ``section.key=value`` (or unique ``key=value``) strings onto ``cfg`` (in place)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value (e.g. train.lr=2e-4)")
        key, raw = item.split("=", 1)
        key = key.strip().lstrip("-")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        if "." in key:
            section, name = key.split(".", 1)
            if section not in SECTIONS:
                raise ConfigError(f"override '{item}': unknown section '{section}'.{_closest(section, SECTIONS)} "
                                  f"Valid sections: {', '.join(SECTIONS)}")
        else:
            owners = _owner_sections(key)
            if len(owners) > 1:
                raise ConfigError(f"override '{item}': '{key}' exists in {owners}; write e.g. {owners[0]}.{key}=...")
            if not owners:
                every = [f"{s}.{f.name}" for s in SECTIONS for f in dataclasses.fields(getattr(cfg, s))]
                bare = {e.split(".", 1)[1]: e for e in every}
                match = difflib.get_close_matches(key, list(bare), n=1, cutoff=0.5)
                hint = f" Did you mean '{bare[match[0]]}'?" if match else ""
                raise ConfigError(f"override '{item}': unknown config key '{key}'.{hint}")
            section, name = owners[0], key
        try:
            _set(getattr(cfg, section), section, name, value)
        except ConfigError as e:
            raise ConfigError(f"override '{item}': {e}") from None
    return cfg


def override_keys(overrides: typing.Sequence[str]) -> set:
    """The ``section.key`` names that ``key=value`` overrides set (a bare key named by its section)."""
    keys = set()
    for item in overrides:
        key = item.split("=", 1)[0].strip().lstrip("-")
        if "." not in key:
            owners = _owner_sections(key)
            key = f"{owners[0]}.{key}" if len(owners) == 1 else key
        keys.add(key)
    return keys


def validate(cfg: Config) -> Config:
    """Range checks that catch a bad config before any training time is spent."""
    m, d, t = cfg.model, cfg.data, cfg.train
    problems = []

    def need(cond, msg):
        if not cond:
            problems.append(msg)

    need(m.hidden_dim > 0, f"model.hidden_dim must be > 0, got {m.hidden_dim}")
    need(m.nheads > 0 and m.hidden_dim % max(m.nheads, 1) == 0,
         f"model.nheads ({m.nheads}) must divide model.hidden_dim ({m.hidden_dim})")
    need(m.enc_layers >= 0, f"model.enc_layers must be >= 0, got {m.enc_layers}")
    need(m.dec_layers >= 1, f"model.dec_layers must be >= 1, got {m.dec_layers}")
    need(m.dim_feedforward > 0, f"model.dim_feedforward must be > 0, got {m.dim_feedforward}")
    need(0.0 <= m.dropout < 1.0, f"model.dropout must be in [0, 1), got {m.dropout}")
    need(m.num_queries > 0, f"model.num_queries must be > 0, got {m.num_queries}")
    need(m.query_groups >= 1, f"model.query_groups must be >= 1 (1: DETR), got {m.query_groups}")
    need(m.num_classes is None or m.num_classes > 0, f"model.num_classes must be > 0 or null, got {m.num_classes}")
    need(m.position_embedding in ("sine", "learned"),
         f"model.position_embedding must be 'sine' or 'learned', got {m.position_embedding!r}")
    need(0.0 < m.eos_coef <= 1.0, f"model.eos_coef must be in (0, 1], got {m.eos_coef}")
    if m.rpe:
        try:
            parse_rpe_spec(m.rpe)
        except ValueError as e:
            problems.append(f"model.rpe: {e}")
    if m.masks:
        problems.extend(mask_head_problems(m.hidden_dim, m.nheads))
        need(m.query_groups == 1, f"model.masks needs model.query_groups=1 (the mask head predicts one mask per "
                                  f"query of DETR), got {m.query_groups}")
    need(m.mask_loss_coef >= 0 and m.dice_loss_coef >= 0,
         f"model.mask_loss_coef and model.dice_loss_coef must be >= 0, got {m.mask_loss_coef}, {m.dice_loss_coef}")
    if t.frozen_weights is not None:
        need(m.masks, "train.frozen_weights trains the mask head of a frozen detector: set model.masks=true "
                      "(to start every weight from a checkpoint, use train.pretrained)")
        need(t.pretrained is None, "train.frozen_weights and train.pretrained both give the starting weights: "
                                   "set only one (frozen_weights freezes the detector, pretrained trains it)")
    need(m.rpe_impl in RPE_IMPLS, f"model.rpe_impl must be one of {', '.join(RPE_IMPLS)}, got {m.rpe_impl!r}")
    need(t.epochs > 0, f"train.epochs must be > 0, got {t.epochs}")
    need(t.batch_size > 0, f"train.batch_size must be > 0, got {t.batch_size}")
    need(t.accumulate >= 1, f"train.accumulate must be >= 1 (micro-batches per optimizer step), got {t.accumulate}")
    need(t.loss_normalization in LOSS_NORMALIZATIONS,
         f"train.loss_normalization must be {' or '.join(LOSS_NORMALIZATIONS)}, got {t.loss_normalization!r}")
    unknown = [p for p in t.activation_checkpointing if p not in ACTIVATION_CHECKPOINTING]
    need(not unknown and len(set(t.activation_checkpointing)) == len(t.activation_checkpointing),
         f"train.activation_checkpointing: a list of distinct parts among {', '.join(ACTIVATION_CHECKPOINTING)}, "
         f"got {t.activation_checkpointing}")
    if t.ema is not None:
        need(0.0 < t.ema.decay < 1.0, f"train.ema.decay must be in (0, 1), got {t.ema.decay}")
        need(t.ema.warmup_steps >= 0, f"train.ema.warmup_steps must be >= 0 (0: no ramp), got {t.ema.warmup_steps}")
    need(t.lr > 0, f"train.lr must be > 0, got {t.lr}")
    need(t.lr_backbone >= 0, f"train.lr_backbone must be >= 0, got {t.lr_backbone}")
    need(t.weight_decay >= 0, f"train.weight_decay must be >= 0, got {t.weight_decay}")
    need(t.clip_max_norm >= 0, f"train.clip_max_norm must be >= 0 (0 disables), got {t.clip_max_norm}")
    need(t.eval_every >= 0, f"train.eval_every must be >= 0, got {t.eval_every}")
    need(t.lr_schedule in ("step", "cosine"), f"train.lr_schedule must be step or cosine, got {t.lr_schedule!r}")
    need(t.warmup_iters >= 0, f"train.warmup_iters must be >= 0, got {t.warmup_iters}")
    need(t.max_minutes is None or t.max_minutes > 0, f"train.max_minutes must be > 0 or null, got {t.max_minutes}")
    need(t.amp in ("none", "bf16", "fp16"), f"train.amp must be none, bf16 or fp16, got {t.amp!r}")
    need(t.keep_last >= 0, f"train.keep_last must be >= 0, got {t.keep_last}")
    need(t.tensorboard_images >= 0, f"train.tensorboard_images must be >= 0, got {t.tensorboard_images}")
    need(t.max_iters_per_epoch is None or t.max_iters_per_epoch > 0,
         f"train.max_iters_per_epoch must be > 0 or null, got {t.max_iters_per_epoch}")
    need(d.max_size > 0 and d.eval_size > 0, "data.max_size and data.eval_size must be > 0")
    need(len(d.train_scales) > 0 and all(isinstance(s, int) and s > 0 for s in d.train_scales),
         f"data.train_scales must be a non-empty list of positive integers, got {d.train_scales}")
    need(d.num_workers >= 0, f"data.num_workers must be >= 0, got {d.num_workers}")
    need(d.dataset in DATASETS, f"data.dataset must be one of {', '.join(DATASETS)}, got {d.dataset!r}")
    need(t.pretrain_iterations >= 0, f"train.pretrain_iterations must be >= 0 (0: none), got {t.pretrain_iterations}")
    need(t.pretrain_batch_size > 0, f"train.pretrain_batch_size must be > 0, got {t.pretrain_batch_size}")
    need(t.pretrain_lr > 0, f"train.pretrain_lr must be > 0, got {t.pretrain_lr}")
    need(t.pretrain_target in ("image", "cells"),
         f"train.pretrain_target must be image or cells, got {t.pretrain_target!r}")
    need(cfg.eval.backend in EVAL_BACKENDS,
         f"eval.backend must be one of {', '.join(EVAL_BACKENDS)}, got {cfg.eval.backend!r}."
         f"{_closest(str(cfg.eval.backend), EVAL_BACKENDS)}")
    need(0.0 <= cfg.eval.confusion_threshold <= 1.0,
         f"eval.confusion_threshold must be in [0, 1], got {cfg.eval.confusion_threshold}")
    if problems:
        raise ConfigError("invalid config:\n  - " + "\n  - ".join(problems))
    return cfg


def mask_head_problems(hidden_dim: int, nheads: int) -> list:
    """Why DETR's mask head cannot be built for ``hidden_dim`` / ``nheads`` (empty if it can): its
    inner widths are ``hidden_dim // 2, 4, 8, 16`` channels, so ``hidden_dim`` must be at least 16.
    (Its group norms take 8 groups where the widths allow, as DETR, else fewer: see
    ``models.segmentation.group_norm``.)"""
    if hidden_dim >= 16:
        return []
    return [f"model.masks: the mask head narrows hidden_dim to hidden_dim / 16 channels, which needs hidden_dim "
            f">= 16, got {hidden_dim}"]


def save_config(cfg: Config, path: Union[str, Path]) -> None:
    """Write ``cfg`` as YAML (atomically)."""
    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def config_from_dict(data: dict) -> Config:
    """Rebuild a Config from ``Config.to_dict()`` output (e.g. stored in a checkpoint)."""
    return merge_dict(Config(), data, source="checkpoint config")
