"""What the ``torch.hub`` entries of ``hubconf.py`` build: official DETR's entries (names, arguments
and weight files of facebookresearch/detr's ``hubconf.py``) and the iRPE model zoo's, as this
project's model.

    model = torch.hub.load("/path/to/detr_irpe", "detr_resnet50_irpe_9x9", source="local", pretrained=True)
    model, postprocessor = hub_model("detr_resnet50", pretrained=True, return_postprocessor=True)

Weights are downloaded once into torch hub's checkpoint folder (``torch.hub.get_dir()/checkpoints``,
the folder official DETR's entries use) by :func:`~detr_irpe.engine.checkpoint.load_checkpoint_file`,
and loaded strictly; a file already there is used without any network access.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Optional, Tuple, Union
from urllib.parse import urlparse

import torch
from torch import nn

from ..config import ModelConfig
from ..engine.checkpoint import load_checkpoint_file, load_for_finetuning, load_model_weights, state_dict_from_checkpoint
from ..errors import CheckpointError, UsageError
from ..models import PostProcessPanoptic, build_detr

DETR_RELEASE = "https://dl.fbaipublicfiles.com/detr/"
IRPE_RELEASE = "https://github.com/wkcn/iRPE-model-zoo/releases/download/1.0/"
PANOPTIC_CLASSES = 250  # the COCO panoptic checkpoints' classes (things are ids 0..90)
PANOPTIC_THRESHOLD = 0.85


@dataclass(frozen=True)
class HubEntry:
    """One entry: its released weights and the model they fit (``ModelConfig`` fields besides the
    DETR-R50 defaults)."""

    url: str
    model: Dict[str, object] = field(default_factory=dict)
    panoptic: bool = False

    @property
    def num_classes(self) -> int:
        return PANOPTIC_CLASSES if self.panoptic else 91


HUB_ENTRIES: Dict[str, HubEntry] = {
    "detr_resnet50": HubEntry(DETR_RELEASE + "detr-r50-e632da11.pth"),
    "detr_resnet50_dc5": HubEntry(DETR_RELEASE + "detr-r50-dc5-f0fb7ef5.pth", {"dilation": True}),
    "detr_resnet101": HubEntry(DETR_RELEASE + "detr-r101-2c7b67e5.pth", {"backbone": "resnet101"}),
    "detr_resnet101_dc5": HubEntry(DETR_RELEASE + "detr-r101-dc5-a2e86def.pth",
                                   {"backbone": "resnet101", "dilation": True}),
    "detr_resnet50_panoptic": HubEntry(DETR_RELEASE + "detr-r50-panoptic-00ce5173.pth", {"masks": True}, True),
    "detr_resnet50_dc5_panoptic": HubEntry(DETR_RELEASE + "detr-r50-dc5-panoptic-da08f1b1.pth",
                                           {"dilation": True, "masks": True}, True),
    "detr_resnet101_panoptic": HubEntry(DETR_RELEASE + "detr-r101-panoptic-40021d53.pth",
                                        {"backbone": "resnet101", "masks": True}, True),
    "detr_resnet50_irpe_7x7": HubEntry(IRPE_RELEASE + "rpe-1.9-product-ctx-1-k.pth",
                                       {"rpe": "rpe-1.9-product-ctx-1-k"}),
    "detr_resnet50_irpe_9x9": HubEntry(IRPE_RELEASE + "rpe-2.0-product-ctx-1-k.pth",
                                       {"rpe": "rpe-2.0-product-ctx-1-k"}),
    "detr_resnet50_irpe_9x9_300ep": HubEntry(IRPE_RELEASE + "rpe-2.0-product-ctx-1-k_300epochs.pth",
                                             {"rpe": "rpe-2.0-product-ctx-1-k"}),
}


def hub_cache_path(url: str) -> Path:
    """Where the weights of ``url`` are kept: torch hub's checkpoint folder, under the file's name."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name


def _entry(name: str) -> HubEntry:
    if name not in HUB_ENTRIES:
        raise UsageError(f"no hub entry {name!r}; the entries are {', '.join(HUB_ENTRIES)}")
    return HUB_ENTRIES[name]


def _released_weights(url: str) -> dict:
    """The checkpoint at ``url``, downloaded into the hub cache once; offline, one error naming the URL
    and the cache path to put the file at."""
    cached = hub_cache_path(url)
    try:
        return load_checkpoint_file(url)
    except CheckpointError as e:
        if cached.is_file():  # the file is there but cannot be read: that message says why
            raise
        reason = e.__context__ if e.__context__ is not None else e  # the download's own error
        raise CheckpointError(f"pretrained=True could not download {url} ({reason}). Without network access, "
                              f"download it elsewhere and copy it to {cached}, where it is loaded "
                              f"from.") from None


def hub_model(name: str, pretrained: bool = False, num_classes: Optional[int] = None,
              return_postprocessor: bool = False, threshold: float = PANOPTIC_THRESHOLD,
              **options) -> Union[nn.Module, Tuple[nn.Module, nn.Module]]:
    """The model of hub entry ``name`` (:data:`HUB_ENTRIES`), with the released weights when
    ``pretrained``.

    Args:
        num_classes: the classification head's classes (default: the checkpoint's, 91 for COCO
            detection, 250 for panoptic). With ``pretrained`` and another number, every weight but
            the class head is loaded and the head starts fresh (fine-tuning; a warning names it).
        return_postprocessor: also return the post-processor: boxes, scores and labels
            (:class:`~detr_irpe.models.PostProcess`) or, for a panoptic entry,
            :class:`~detr_irpe.models.PostProcessPanoptic` keeping segments above ``threshold``.
        options: other :class:`~detr_irpe.config.ModelConfig` fields, e.g. ``rpe_impl="sdpa"`` or
            ``backbone_weights="imagenet"`` (a random model otherwise starts with a random backbone too;
            official DETR's ``pretrained=False`` starts from ImageNet weights).

    Raises:
        CheckpointError: the weights cannot be downloaded (offline: the message names the URL and where
            to put the file) or do not fit the model.
    """
    entry = _entry(name)
    classes = entry.num_classes if num_classes is None else int(num_classes)
    fields = {"backbone_weights": "none", **entry.model, "num_classes": classes, **options}
    if pretrained and fields["backbone_weights"] != "none":
        raise UsageError("backbone_weights applies to pretrained=False: the released weights hold the backbone")
    try:
        model, _, postprocessor = build_detr(ModelConfig(), **fields)
    except TypeError as e:  # a keyword that is not a ModelConfig field (the message names the closest)
        raise UsageError(f"hub entry {name}: {e}") from None
    if pretrained:
        state = state_dict_from_checkpoint(_released_weights(entry.url))
        if classes == entry.num_classes:
            load_model_weights(model, state, strict=True, source=entry.url)
        else:
            report = load_for_finetuning(model, state, source=entry.url)
            warnings.warn(f"{name}: num_classes={classes} (the checkpoint has {entry.num_classes}): "
                          f"{', '.join(report.skipped)} start fresh", stacklevel=2)
    model.eval()  # for inference; call model.train() to fine-tune
    if not return_postprocessor:
        return model
    if entry.panoptic:
        postprocessor = PostProcessPanoptic({i: i <= 90 for i in range(classes)}, threshold=threshold)
    return model, postprocessor
