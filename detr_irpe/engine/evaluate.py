"""COCO evaluation of a model over a dataset (any number of processes)."""
from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Dict, Optional, Sequence
from urllib.parse import urlparse

import torch
from torch import nn
from tqdm import tqdm

from ..data import build_dataloader, build_dataset
from ..evaluation import ClassMismatchError, ClassMismatchWarning, CocoEvaluator, class_mismatch, encode_masks
from ..files import check_writable, fresh_folder, refuse_existing
from . import distributed as du
from .inference import load_detector
from .step import autocast_context, to_device

EVAL_FILES = ("metrics.json", "detections.json", "segm_detections.json")  # the last for a segmentation model
# the outputs post-processing reads (the rest, auxiliary outputs, stays behind)
POSTPROCESSED = ("pred_logits", "pred_boxes", "pred_masks", "input_sizes", "pred_masks_sizes")


@torch.no_grad()
def predict_dataset(model: nn.Module, postprocessor: nn.Module, dataset, device: torch.device,
                    batch_size: int = 2, num_workers: int = 0, amp: str = "none", quiet: bool = False, *,
                    batched_backbone: bool = False) -> Dict[int, dict]:
    """Detections of this process's share of ``dataset``: ``{image_id: {scores, labels, boxes}}``,
    and for a segmentation model ``segmentations``: the RLE of each query's mask (see
    :func:`~detr_irpe.evaluation.encode_masks`; masks at full size would not fit in memory).

    Boxes and masks are in the original image size, boxes absolute ``(x1, y1, x2, y2)``. The CNN
    (and the mask head) sees each image unpadded, so an image's detections do not depend on the
    batch size or on what it is batched with, unless ``batched_backbone`` (the padded batch, as
    training does).
    """
    model.eval()
    loader = build_dataloader(dataset, batch_size, train=False, num_workers=num_workers)
    detections: Dict[int, dict] = {}
    for images, masks, targets in tqdm(loader, desc="eval", disable=quiet or not du.is_main_process(),
                                       leave=False, dynamic_ncols=True):
        images, masks, targets = to_device(images, masks, targets, device)
        with autocast_context(device, amp):
            outputs = model(images, masks, batched_backbone=batched_backbone)
        outputs = {k: v.float() if v.is_floating_point() else v for k, v in outputs.items() if k in POSTPROCESSED}
        sizes = torch.stack([t["orig_size"] for t in targets])
        for target, result in zip(targets, postprocessor(outputs, sizes)):
            if "masks" in result:
                result["segmentations"] = encode_masks(result.pop("masks"))
            detections[int(target["image_id"])] = {k: v.cpu() if torch.is_tensor(v) else v for k, v in result.items()}
    return detections


def evaluate(model: nn.Module, postprocessor: nn.Module, dataset, device: torch.device, batch_size: int = 2,
             num_workers: int = 0, output_dir: Optional[Path] = None, amp: str = "none",
             quiet: bool = False, *, batched_backbone: bool = False, table: bool = True,
             caveats: Sequence[str] = ()) -> dict:
    """COCO bbox mAP of ``model`` on ``dataset`` (and mask mAP for a segmentation model); detections
    gathered from every process.

    Writes ``detections.json`` (and ``segm_detections.json`` for masks) and ``metrics.json`` into
    ``output_dir`` (main process) and
    returns the metrics (the 12 standard numbers, per-class AP, for masks the same prefixed
    ``segm_``, and, given ``caveats`` (what makes them less than they seem), ``warnings``) on every
    process. Prints pycocotools' table and the per-class AP if ``table`` and not ``quiet``.
    """
    detections = predict_dataset(model, postprocessor, dataset, device, batch_size, num_workers, amp, quiet,
                                 batched_backbone=batched_backbone)
    evaluator = CocoEvaluator(dataset.coco)
    evaluator.update(detections)
    evaluator.synchronize()
    metrics = {}
    if du.is_main_process():
        metrics = evaluator.summarize(verbose=table and not quiet)
        if caveats:
            metrics["warnings"] = list(caveats)
        if output_dir is not None:
            evaluator.write(output_dir)
    return du.broadcast_object(metrics)


def default_eval_dir(checkpoint: str) -> Path:
    """Where ``eval`` writes without ``--output-dir``: beside a local checkpoint
    (``<its folder>/eval_<its name>``), else ``outputs/eval_<name>``; numbered (``-2``, ``-3``, ...)
    when an earlier evaluation is there."""
    path = Path(checkpoint).expanduser()
    if path.exists():
        base = path.parent / f"eval_{path.stem if path.is_file() else path.name}"
    else:  # a URL or a hub id
        name = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(urlparse(str(checkpoint)).path).stem or str(checkpoint))
        base = Path("outputs") / f"eval_{name.strip('_') or 'checkpoint'}"
    return fresh_folder(base)


def eval_output_dir(checkpoint: str, output_dir: Optional[str], overwrite: bool) -> Path:
    """The folder an evaluation writes to, checked to be writable; an explicit ``output_dir`` that
    holds an earlier evaluation's files is refused unless ``overwrite``."""
    if output_dir is None:
        out = default_eval_dir(checkpoint)
    else:
        out = Path(output_dir)
        if not overwrite:
            refuse_existing([out / name for name in EVAL_FILES],
                            "pass --overwrite to replace them, or choose another --output-dir")
    return check_writable(out, "--output-dir")


def evaluate_checkpoint(checkpoint: str, config_path: Optional[str] = None, overrides=(), *,
                        output_dir: Optional[str] = None, device: str = "auto", batch_size: Optional[int] = None,
                        quiet: bool = False, batched_backbone: bool = False, overwrite: bool = False,
                        strict: bool = False) -> dict:
    """COCO mAP of a checkpoint file (ours, official DETR, iRPE model zoo) on the config's val split.

    Writes ``metrics.json`` and ``detections.json`` (a segmentation model also ``segm_detections.json``,
    its masks as COCO segmentation results) into ``output_dir`` (see
    :func:`eval_output_dir`; the folder is in the returned metrics as ``output_dir``).
    ``batched_backbone``: run the CNN on padded batches, as training does (see :func:`predict_dataset`).
    When the model's classes are not the annotations' categories the AP measures nothing: that is
    a :class:`ClassMismatchWarning` and a ``warnings`` entry in ``metrics.json``, or with ``strict``
    a :class:`ClassMismatchError` before any work.
    """
    torch_device = du.init_distributed(device, option="--device")
    out = du.on_main_process(eval_output_dir, checkpoint, output_dir, overwrite)
    detector = load_detector(checkpoint, config_path, overrides, device=str(torch_device))
    cfg = detector.config
    dataset = build_dataset(cfg.data, "val", masks=cfg.model.masks)
    problems = []
    mismatch = class_mismatch(detector.categories, cfg.model.num_classes, dataset.categories)
    if mismatch:
        message = (f"the model's classes are not the categories of {dataset.annotation_file}: {mismatch}. "
                   f"The AP below measures nothing meaningful: evaluate on the data the model was trained for")
        if strict:
            raise ClassMismatchError(message)
        if du.is_main_process():
            warnings.warn(message, ClassMismatchWarning, stacklevel=2)
        problems.append(message)
    metrics = evaluate(detector.model, detector.postprocessor, dataset, torch_device,
                       batch_size=batch_size or cfg.train.batch_size, num_workers=cfg.data.num_workers,
                       output_dir=out, amp=cfg.train.amp, quiet=quiet, batched_backbone=batched_backbone,
                       caveats=problems)
    du.cleanup_distributed()
    return {**metrics, "output_dir": str(out)}
