"""Panoptic evaluation of a segmentation model over a COCO panoptic dataset (any number of
processes): post-processing (official DETR's), PQ / SQ / RQ, the predictions in COCO panoptic format.

Training validation and ``eval`` come here for a config with ``data.dataset=coco_panoptic`` and
``model.masks`` (:func:`is_panoptic`); a panoptic config without masks (the detector of DETR's
first stage) is evaluated by box AP as any detector.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn
from tqdm import tqdm

from ..config import Config
from ..data import build_dataloader
from ..data.panoptic import CocoPanoptic, read_png_ids
from ..evaluation import PQStats, all_gather_object
from ..evaluation.panoptic import format_pq
from ..files import atomic_write, atomic_write_json
from ..models import PostProcessPanoptic
from . import distributed as du
from .step import autocast_context, to_device

PREDICTIONS_FILE, PNG_FOLDER, METRICS_FILE = "panoptic_predictions.json", "panoptic_predictions", "metrics.json"
POSTPROCESSED = ("pred_logits", "pred_masks", "input_sizes", "pred_masks_sizes")


def is_panoptic(cfg: Config) -> bool:
    """Whether ``cfg`` is evaluated by PQ: a mask model on COCO panoptic data."""
    return cfg.data.dataset == "coco_panoptic" and cfg.model.masks


def pq_metrics(result: dict, names: Dict[int, str], stats: PQStats) -> dict:
    """The flat ``metrics.json`` entries of :func:`~detr_irpe.evaluation.evaluate_panoptic`'s
    result: ``PQ, SQ, RQ`` (All), ``PQ_th, ...`` (things), ``PQ_st, ...`` (stuff), each in [0, 1],
    ``PQ_per_class`` by category name, the whole result under ``panoptic`` and the counts behind
    it under ``PQ_counts`` (per category name: ``tp``, ``fp``, ``fn``)."""
    metrics = {}
    for group, suffix in (("All", ""), ("Things", "_th"), ("Stuff", "_st")):
        for key in ("pq", "sq", "rq"):
            metrics[key.upper() + suffix] = result[group][key]
    metrics["PQ_per_class"] = {names.get(c, str(c)): s["pq"] for c, s in result["per_class"].items()}
    metrics["panoptic"] = {**result, "per_class": {str(c): s for c, s in result["per_class"].items()}}
    metrics["PQ_counts"] = {names.get(c, str(c)): {"tp": stats.tp.get(c, 0), "fp": stats.fp.get(c, 0),
                                                   "fn": stats.fn.get(c, 0)} for c in result["per_class"]}
    return metrics


@torch.no_grad()
def evaluate_panoptic_model(model: nn.Module, postprocessor: Optional[nn.Module], dataset: CocoPanoptic,
                            device: torch.device, batch_size: int = 2, num_workers: int = 0,
                            output_dir: Optional[Path] = None, amp: str = "none", quiet: bool = False, *,
                            batched_backbone: bool = False, table: bool = True, caveats: Sequence[str] = (),
                            threshold: float = 0.85) -> dict:
    """PQ of ``model`` on ``dataset`` (its share per process, statistics summed over processes).

    The arguments are :func:`~detr_irpe.engine.evaluate.evaluate`'s (``postprocessor`` is not used:
    the panoptic one, :class:`~detr_irpe.models.PostProcessPanoptic` with ``threshold``, is built
    from the dataset's things and stuff). With ``output_dir``: each image's PNG into
    ``<output_dir>/panoptic_predictions/``, ``panoptic_predictions.json`` (COCO panoptic format)
    and ``metrics.json`` (see :func:`pq_metrics`). Returns the metrics on every process.
    """
    model.eval()
    panoptic = PostProcessPanoptic(dataset.is_thing_map, threshold=threshold)
    loader = build_dataloader(dataset, batch_size, train=False, num_workers=num_workers)
    # per image: under DDP the loader evens out the shards by repeating a few images, counted once here
    stats: Dict[int, PQStats] = {}
    annotations: Dict[int, dict] = {}
    png_dir = Path(output_dir) / PNG_FOLDER if output_dir is not None else None
    if png_dir is not None:
        png_dir.mkdir(parents=True, exist_ok=True)
    index_of = {image_id: i for i, image_id in enumerate(dataset.ids)}
    for images, masks, targets in tqdm(loader, desc="eval (panoptic)", leave=False, dynamic_ncols=True,
                                       disable=quiet or not du.is_main_process()):
        images, masks, targets = to_device(images, masks, targets, device)
        with autocast_context(device, amp):
            outputs = model(images, masks, batched_backbone=batched_backbone)
        outputs = {k: v.float() if v.is_floating_point() else v for k, v in outputs.items() if k in POSTPROCESSED}
        original = torch.stack([t["orig_size"] for t in targets]).cpu()
        for target, result in zip(targets, panoptic(outputs, outputs["input_sizes"].cpu(), original)):
            image_id = int(target["image_id"])
            index = index_of[image_id]
            gt = dataset.by_image[image_id]
            stats[image_id] = PQStats()
            stats[image_id].add_image(read_png_ids(dataset.png_path(index)), gt["segments_info"],
                                      result["ids"].numpy(), result["segments_info"], where=f"image {image_id}")
            file_name = Path(gt["file_name"]).with_suffix(".png").name
            if png_dir is not None:
                atomic_write(png_dir / file_name, lambda f, data=result["png_string"]: f.write(data))
            annotations[image_id] = {"image_id": image_id, "file_name": file_name,
                                     "segments_info": result["segments_info"]}
    every_image: Dict[int, PQStats] = {}
    for part in all_gather_object(stats):
        every_image.update(part)
    parts = all_gather_object(annotations)
    metrics: dict = {}
    if du.is_main_process():
        categories = {c["id"]: c for c in dataset.panoptic["categories"]}
        total = PQStats()
        for image_stats in every_image.values():
            total.merge(image_stats)
        result = total.summarize(categories)
        names = {c: str(info.get("name", c)) for c, info in categories.items()}
        metrics = pq_metrics(result, names, total)
        if caveats:
            metrics["warnings"] = list(caveats)
        if table and not quiet:
            print(format_pq(result, names), flush=True)
        if output_dir is not None:
            merged: List[dict] = [a for _, a in sorted({k: v for part in parts for k, v in part.items()}.items())]
            atomic_write_json(Path(output_dir) / PREDICTIONS_FILE,
                              {"annotations": merged, "categories": dataset.panoptic["categories"]})
            atomic_write_json(Path(output_dir) / METRICS_FILE, metrics, indent=2)
    return du.broadcast_object(metrics)

