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
from ..evaluation import (ClassMismatchError, ClassMismatchWarning, CocoEvaluator, class_mismatch, encode_masks,
                          infer_iou_type, load_annotations, load_results)
from ..evaluation.coco_eval import ANALYSIS_FILE, METRICS_FILE
from ..files import atomic_write_json, check_writable, fresh_folder, refuse_existing, refuse_inputs
from ..visualize.eval_plots import write_eval_pictures
from . import distributed as du
from .evaluate_panoptic import PREDICTIONS_FILE as PANOPTIC_PREDICTIONS
from .evaluate_panoptic import evaluate_panoptic_model, is_panoptic
from .inference import load_detector
from .step import autocast_context, to_device

EVAL_FILES = ("metrics.json", "detections.json", "segm_detections.json",  # segm_: a segmentation model
              "analysis.json",  # with eval.pictures: the arrays behind the pictures in eval_pictures/
              PANOPTIC_PREDICTIONS)  # a panoptic model (engine/evaluate_panoptic.py)
EVAL_PICTURES = "eval_pictures"
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
             caveats: Sequence[str] = (), backend: str = "auto", pictures: bool = False,
             confusion_threshold: float = 0.5) -> dict:
    """COCO bbox mAP of ``model`` on ``dataset`` (and mask mAP for a segmentation model); detections
    gathered from every process.

    Writes ``detections.json`` (and ``segm_detections.json`` for masks) and ``metrics.json`` into
    ``output_dir`` (main process) and
    returns the metrics (the 12 standard numbers, per-class AP, for masks the same prefixed
    ``segm_``, and, given ``caveats`` (what makes them less than they seem), ``warnings``) on every
    process. Prints which library computed the AP (``backend``, see
    :func:`~detr_irpe.evaluation.resolve_backend`), pycocotools' table and the per-class AP if
    ``table`` and not ``quiet``. With ``pictures`` and an ``output_dir``, also ``analysis.json`` and
    the pictures that explain the AP in ``output_dir/eval_pictures`` (their paths under
    ``pictures`` in the returned metrics, not in ``metrics.json``); the confusion matrix counts the
    detections scoring at least ``confusion_threshold``.
    """
    detections = predict_dataset(model, postprocessor, dataset, device, batch_size, num_workers, amp, quiet,
                                 batched_backbone=batched_backbone)
    evaluator = CocoEvaluator(dataset.coco, backend=backend)
    evaluator.update(detections)
    evaluator.synchronize()
    metrics = {}
    if du.is_main_process():
        metrics = evaluator.summarize(verbose=table and not quiet)
        if caveats:
            metrics["warnings"] = list(caveats)
        if output_dir is not None:
            evaluator.write(output_dir)
            if pictures:
                analysis = evaluator.write_analysis(output_dir, confusion_threshold)
                written = write_eval_pictures(analysis, Path(output_dir) / EVAL_PICTURES)
                metrics = {**metrics, "pictures": {name: str(path) for name, path in written.items()}}
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
    if is_panoptic(cfg):  # PQ for a panoptic mask model
        metrics = evaluate_panoptic_model(detector.model, None, dataset, torch_device,
                                          batch_size=batch_size or cfg.train.batch_size,
                                          num_workers=cfg.data.num_workers, output_dir=out, amp=cfg.train.amp,
                                          quiet=quiet, batched_backbone=batched_backbone, caveats=problems)
        du.cleanup_distributed()
        return {**metrics, "output_dir": str(out)}
    metrics = evaluate(detector.model, detector.postprocessor, dataset, torch_device,
                       batch_size=batch_size or cfg.train.batch_size, num_workers=cfg.data.num_workers,
                       output_dir=out, amp=cfg.train.amp, quiet=quiet, batched_backbone=batched_backbone,
                       caveats=problems, backend=cfg.eval.backend, pictures=cfg.eval.pictures,
                       confusion_threshold=cfg.eval.confusion_threshold)
    du.cleanup_distributed()
    return {**metrics, "output_dir": str(out)}


def evaluate_results(results: str, annotations: str, *, output_dir: Optional[str] = None, backend: str = "auto",
                     iou_type: Optional[str] = None, pictures: bool = True, confusion_threshold: float = 0.5,
                     overwrite: bool = False, quiet: bool = False) -> dict:
    """COCO AP of a results file (any detector's, COCO results format) against an annotations file,
    without a model: ``metrics.json`` (what :func:`~detr_irpe.evaluation.evaluate_detections`
    returns), and with ``pictures`` ``analysis.json`` and ``eval_pictures/``, into ``output_dir``
    (default: ``eval_<results name>`` beside the results, numbered if taken). ``iou_type``: bbox or
    segm, default from the results. Returns the metrics with ``output_dir``."""
    detections = load_results(results)
    iou_type = iou_type or infer_iou_type(detections)
    out = fresh_folder(Path(results).expanduser().parent / f"eval_{Path(results).stem}") if output_dir is None \
        else Path(output_dir)
    written = [out / METRICS_FILE, out / ANALYSIS_FILE]
    if output_dir is not None and not overwrite:
        refuse_existing(written, "pass --overwrite to replace them, or choose another --output-dir")
    refuse_inputs(written, [results, annotations],
                  "choose an --output-dir that does not hold the inputs")
    check_writable(out, "--output-dir")
    evaluator = CocoEvaluator(load_annotations(annotations), backend=backend)
    evaluator.add_results(detections, iou_type)
    metrics = evaluator.summarize(verbose=not quiet, iou_types=(iou_type,))
    atomic_write_json(out / METRICS_FILE, metrics, indent=2)
    if pictures:
        analysis = evaluator.write_analysis(out, confusion_threshold)
        write_eval_pictures(analysis, out / EVAL_PICTURES)
    return {**metrics, "output_dir": str(out)}
