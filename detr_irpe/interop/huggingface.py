"""Hugging Face ``transformers`` DETR folders (and hub ids) <-> checkpoint dicts of this project.

A transformers DETR is a folder holding ``config.json`` and ``model.safetensors`` (older uploads:
``pytorch_model.bin``), as ``DetrForObjectDetection.save_pretrained`` (or ``DetrForSegmentation``'s:
a model with masks) writes it and as models
such as ``facebook/detr-resnet-50`` sit on the hub. :func:`checkpoint_from_hf` turns its config
and weights into what :func:`detr_irpe.engine.checkpoint.load_checkpoint_file` returns for our
own files; :func:`save_hf_folder` writes the other way. Reading the weights file itself is the
caller's job (``load_checkpoint_file`` reads ``pytorch_model.bin`` with the same restricted
``torch.load`` as any checkpoint).

Reading a folder needs no optional library. ``huggingface_hub`` (hub ids) and ``transformers``
(writing a folder) are imported inside the functions that use them, through
:func:`~detr_irpe.optional.require`: importing this module loads neither.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Mapping, Optional, Tuple, Union

from torch import Tensor

from ..config import Config, DataConfig, ModelConfig
from ..errors import CheckpointError, CheckpointNotFoundError
from ..files import atomic_write_text, make_folder
from ..optional import require
from .hf_config import (backbone_from_hf, categories_from_hf, hf_backbone_for, hf_config_from_model,
                        model_config_from_hf)
from .hf_weights import check_fits, hf_to_ours, our_shapes, ours_to_hf, position_embedding_prefix
from .safetensors_io import save_safetensors

CONFIG_FILE = "config.json"
PREPROCESSOR_FILE = "preprocessor_config.json"  # the image processor's settings (resize, normalisation)
PANOPTIC_FORMAT = "coco_panoptic"  # its "format" for a panoptic model, and data.dataset here
WEIGHTS_FILES = ("model.safetensors", "pytorch_model.bin")  # in order of preference
WRITTEN_FILES = (CONFIG_FILE, PREPROCESSOR_FILE, WEIGHTS_FILES[0])  # what save_hf_folder writes
_TRUE = ("1", "ON", "YES", "TRUE")  # the values huggingface_hub reads as true in HF_HUB_OFFLINE
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

    With ``HF_HUB_OFFLINE=1`` only the cache is read and no connection is made. Otherwise one
    request without retries (:func:`_hub_unreachable`) first checks that the hub answers; if it
    does not (no network, a firewall, ``HF_ENDPOINT`` pointing nowhere), the cache is read as
    with ``HF_HUB_OFFLINE=1``, instead of huggingface_hub's own retries (7 connections, 23 s of backoff).

    Raises:
        MissingExtraError: ``huggingface_hub`` is not installed.
        CheckpointError: the hub cannot be reached or is not to be asked, and the files are not
            cached (the message names the cache folder and the ways on); or the repository /
            revision / files do not exist.
    """
    feature = f"the Hugging Face hub id {hub_id!r}"
    hub, constants = require("huggingface_hub", feature), require("huggingface_hub.constants", feature)
    not_found = require("huggingface_hub.errors", feature).EntryNotFoundError  # remote, or not in the cache
    repo, _, revision = hub_id.partition("@")
    revision = revision or None
    offline = constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in _TRUE
    why_not = "HF_HUB_OFFLINE=1 is set" if offline else _hub_unreachable(hub, constants, repo, revision)
    try:
        config = Path(hub.hf_hub_download(repo, CONFIG_FILE, revision=revision, local_files_only=bool(why_not)))
        for name in WEIGHTS_FILES:
            try:
                hub.hf_hub_download(repo, name, revision=revision, local_files_only=bool(why_not))
                break
            except not_found:  # not in the repository (or not cached): try the next
                if name == WEIGHTS_FILES[-1]:
                    raise
    except (OSError, ValueError, not_found) as e:  # hub errors are OSErrors; bad ids ValueErrors
        download = (f"download it on a machine that has access, e.g. `hf download {repo} "
                    f"{'--revision ' + revision + ' ' if revision else ''}{CONFIG_FILE} {WEIGHTS_FILES[0]} "
                    f"--local-dir DIR` (older repositories have {WEIGHTS_FILES[1]} instead), copy DIR here and pass "
                    f"the path of that folder")
        if why_not:
            raise CheckpointError(
                f"{hub_id!r} is not a local file or folder, and {why_not}, so only the Hugging Face cache "
                f"({constants.HF_HUB_CACHE}) was read, which does not hold it. Either run once with network access "
                f"(the files are then cached, and HF_HUB_OFFLINE=1 reads them from the cache without asking the "
                f"hub), or {download}") from None
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{hub_id!r} is not a local file or folder, and fetching it from the Hugging Face hub "
                              f"failed ({type(e).__name__}: {reason}). Check the id and revision, or {download}"
                              ) from None
    return config.parent


def _hub_unreachable(hub, constants, repo: str, revision: Optional[str]) -> Optional[str]:
    """None when the hub answers a request for ``repo``'s config.json, whatever the answer (a missing
    repository is reported by the download that follows); otherwise why it cannot be reached.

    One request, no retries, waiting at most ``HF_HUB_ETAG_TIMEOUT`` seconds (huggingface_hub's
    setting, 10 by default) for a server that does not answer. A server error (5xx) counts as
    unreachable: huggingface_hub would retry it for 23 s before reading the cache.
    """
    url = hub.hf_hub_url(repo, CONFIG_FILE, revision=revision)
    try:
        hub.get_hf_file_metadata(url, timeout=constants.HF_HUB_ETAG_TIMEOUT)
    except Exception as e:  # noqa: BLE001 - refused, reset, timed out, proxy, TLS: every HTTP library has its own
        status = getattr(getattr(e, "response", None), "status_code", None)
        if isinstance(status, int) and status < 500:
            return None  # the hub answered: not found, gated, unauthorised
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return f"the hub at {constants.ENDPOINT} cannot be reached ({type(e).__name__}: {reason})"
    return None


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


def read_processor_size(folder: Union[str, os.PathLike]) -> Optional[Tuple[int, int]]:
    """``(shortest_edge, longest_edge)`` of a model folder's ``preprocessor_config.json`` (the resize
    of its images), or None when it has none or the file gives no such sizes (read as plain JSON:
    no transformers needed)."""
    path = Path(folder) / PREPROCESSOR_FILE
    try:
        size = json.loads(path.read_text()).get("size") or {}
    except (OSError, ValueError, AttributeError):
        return None
    edges = (size.get("shortest_edge"), size.get("longest_edge")) if isinstance(size, dict) else (None, None)
    return edges if all(isinstance(e, int) and e > 0 for e in edges) else None


def read_processor_format(folder: Union[str, os.PathLike]) -> Optional[str]:
    """The annotation ``format`` of a model folder's ``preprocessor_config.json`` (``coco_panoptic``
    for a panoptic model such as ``facebook/detr-resnet-50-panoptic``), or None."""
    try:
        value = json.loads((Path(folder) / PREPROCESSOR_FILE).read_text()).get("format")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


def checkpoint_from_hf(hf_state: Mapping[str, Tensor], hf_config: Mapping, source: str = "config.json",
                       image_size: Optional[Tuple[int, int]] = None, panoptic: bool = False) -> dict:
    """A transformers DETR's weights and config.json as a checkpoint dict of this project.

    ``image_size``: ``(shortest, longest)`` side of its image processor (:func:`read_processor_size`),
    which becomes the config's ``data.eval_size`` / ``data.max_size``. ``panoptic``: its processor's
    format is ``coco_panoptic`` (:func:`read_processor_format`): the config then reads COCO panoptic
    data in official DETR's layout (``data.dataset=coco_panoptic``, ``annotations/panoptic_*2017.json``),
    so that eval and predict give PQ and panoptic maps.

    Returns:
        ``{"model": state dict with official-DETR keys, "config": Config.to_dict() with the model
        section from config.json (and the resize), "categories": {class index: name} from id2label}``.

    Raises:
        CheckpointError: the config describes a model ours cannot represent (every such field is
            listed), or the weights do not map exactly onto it (every extra, missing or misshapen
            key is listed).
    """
    classifier = hf_state.get("class_labels_classifier.weight", hf_state.get("detr.class_labels_classifier.weight"))
    categories = categories_from_hf(hf_config)
    num_classes = int(classifier.shape[0]) - 1 if classifier is not None else len(categories)
    model_cfg = model_config_from_hf(hf_config, num_classes, source)
    state, origin = hf_to_ours(hf_state, backbone_from_hf(hf_config, source).layout, source)
    check_fits(state, our_shapes(model_cfg), source, origin)
    cfg = Config(model=model_cfg)
    if image_size is not None:
        cfg.data.eval_size, cfg.data.max_size = image_size
    if panoptic:
        cfg.data.dataset = PANOPTIC_FORMAT
        cfg.data.train_annotations, cfg.data.val_annotations = (f"annotations/panoptic_{split}2017.json"
                                                                for split in ("train", "val"))
    return {"model": state, "config": cfg.to_dict(), "categories": categories}


def save_hf_folder(out_dir: Union[str, os.PathLike], state_dict: Mapping[str, Tensor], model_config: ModelConfig,
                   categories: Mapping[int, str], backbone_layout: Optional[str] = None,
                   data_config: Optional[DataConfig] = None) -> Path:
    """Write a plain DETR as a transformers model folder (``config.json``, ``preprocessor_config.json``,
    ``model.safetensors``); a segmentation model (``model.masks``) as a ``DetrForSegmentation``, whose
    ``pred_masks`` are ours.

    ``transformers.DetrForObjectDetection.from_pretrained(out_dir)`` loads it and computes the
    same ``logits`` / ``pred_boxes`` as our ``pred_logits`` / ``pred_boxes``, and
    ``transformers.pipeline("object-detection", model=out_dir)`` detects with it, resizing images
    as our evaluation does (:func:`image_processor_config`) and naming classes from ``id2label``.
    By default the backbone is written as transformers' own ResNet, so loading needs
    ``transformers`` and nothing more; a DC5 model is written with a timm backbone (transformers
    dilates only those) and also needs ``timm``. A learned position embedding is stored where the
    installed transformers looks for it (4.x and 5 differ, and each loads only its own place).

    Args:
        state_dict: our model's state dict (official DETR keys).
        model_config: the config it was built from.
        categories: ``{class index: name}`` for ``id2label``.
        backbone_layout: ``"native"`` or ``"timm"`` to choose; None as above.
        data_config: its ``eval_size`` / ``max_size`` set the image processor's resize (None: the
            defaults, 800 / 1333).

    Returns the folder.

    Raises:
        MissingExtraError: ``transformers`` is not installed (it writes the image processor's file).
        CheckpointError: iRPE, the ``tiny`` backbone or pre-norm (transformers' DETR has none of
            them), or weights that do not fit ``model_config``.
    """
    processor = image_processor_config(data_config or DataConfig())  # needs transformers: fail before any work
    hf_config = hf_config_from_model(model_config, categories, backbone_layout)  # refuses what it cannot express
    expected = our_shapes(model_config)
    check_fits(state_dict, expected, "cannot write a Hugging Face folder")
    hf_state = ours_to_hf({k: state_dict[k] for k in expected}, hf_backbone_for(model_config, backbone_layout).layout,
                          position_prefix=position_embedding_prefix())
    out = make_folder(out_dir, "output folder")
    save_safetensors(out / WEIGHTS_FILES[0], hf_state)
    atomic_write_text(out / PREPROCESSOR_FILE, processor)
    # config.json last: it is what marks a folder as a transformers model
    atomic_write_text(out / CONFIG_FILE, json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
    return out


def image_processor_config(data_config: DataConfig) -> str:
    """``preprocessor_config.json`` of the ``DetrImageProcessor`` that prepares images as our evaluation
    does (:func:`detr_irpe.data.make_eval_transforms`): shortest side ``eval_size``, longest at most
    ``max_size``, bilinear, values scaled by 1/255 and normalised with the ImageNet mean / std
    (DetrImageProcessor's defaults, which are ours), padded bottom-right with a pixel mask.

    Written by the installed transformers itself, so that it reads it back. Its resize rounds
    the output size its own way, which can differ from ours by a pixel (README).

    Raises:
        MissingExtraError: ``transformers`` is not installed.
    """
    transformers = require("transformers", "writing a Hugging Face transformers folder (--to hf)")
    processor = transformers.DetrImageProcessor(
        size={"shortest_edge": data_config.eval_size, "longest_edge": data_config.max_size},
        do_resize=True, do_rescale=True, rescale_factor=1 / 255, do_normalize=True, do_pad=True,
        format=PANOPTIC_FORMAT if data_config.dataset == PANOPTIC_FORMAT else "coco_detection")
    return processor.to_json_string()
