"""COCO box AP (and mask AP for a segmentation model) with pycocotools, over detections gathered
from every process."""
from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Union

import numpy as np
import torch
import torch.distributed as dist
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torchvision.ops import box_convert

from ..errors import UsageError
from ..files import atomic_write_json

# The 12 numbers of COCOeval.summarize() for boxes, in its order.
METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
SEGM = "segm_"  # prefix of the mask metrics: segm_AP, ..., segm_ARl, segm_per_class_AP
DETECTIONS_FILE, SEGM_DETECTIONS_FILE, METRICS_FILE = "detections.json", "segm_detections.json", "metrics.json"


def to_coco_results(image_id: int, prediction: Mapping) -> List[dict]:
    """One image's ``{scores (N,), labels (N,), boxes (N, 4) absolute xyxy}`` -> COCO result dicts (xywh)."""
    boxes = torch.as_tensor(prediction["boxes"], dtype=torch.float32).detach().cpu().reshape(-1, 4)
    boxes = box_convert(boxes, "xyxy", "xywh").tolist()
    scores = torch.as_tensor(prediction["scores"]).detach().cpu().reshape(-1).tolist()
    labels = torch.as_tensor(prediction["labels"]).detach().cpu().reshape(-1).tolist()
    if not len(boxes) == len(scores) == len(labels):
        raise UsageError(f"image {image_id}: {len(boxes)} boxes, {len(scores)} scores and {len(labels)} labels; "
                         f"each detection needs one of each")
    return [{"image_id": image_id, "category_id": int(label), "bbox": box, "score": float(score)}
            for box, score, label in zip(boxes, scores, labels)]


def encode_masks(masks) -> List[dict]:
    """``(N, H, W)`` binary masks -> N COCO RLE dicts (``counts`` as a string, ready for JSON)."""
    masks = torch.as_tensor(masks).detach().cpu().to(torch.uint8).numpy()
    if masks.shape[0] == 0:
        return []
    rles = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0)))
    return [{"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")} for rle in rles]


def to_coco_segm_results(image_id: int, prediction: Mapping) -> List[dict]:
    """One image's ``{scores (N,), labels (N,), masks (N, H, W) bool}`` (or ``segmentations``: N RLE
    dicts, see :func:`encode_masks`) -> COCO segmentation result dicts."""
    rles = prediction["segmentations"] if "segmentations" in prediction else encode_masks(prediction["masks"])
    scores = torch.as_tensor(prediction["scores"]).detach().cpu().reshape(-1).tolist()
    labels = torch.as_tensor(prediction["labels"]).detach().cpu().reshape(-1).tolist()
    if not len(rles) == len(scores) == len(labels):
        raise UsageError(f"image {image_id}: {len(rles)} masks, {len(scores)} scores and {len(labels)} labels; "
                         f"each detection needs one of each")
    return [{"image_id": image_id, "category_id": int(label), "segmentation": rle, "score": float(score)}
            for rle, score, label in zip(rles, scores, labels)]


def all_gather_object(obj) -> list:
    """``[obj of rank 0, obj of rank 1, ...]``; ``[obj]`` when not running distributed."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def per_class_ap(coco_eval: COCOeval, names: Mapping[int, str]) -> Dict[str, float]:
    """AP@[.5:.95] per category (all areas, 100 detections), for categories with ground truth.

    ``coco_eval`` must have been accumulated. Categories without ground truth in the evaluated
    images have no AP (pycocotools marks them -1) and are left out.
    """
    precision = coco_eval.eval["precision"]  # (iou thresholds, recall thresholds, classes, areas, max dets)
    out = {}
    for k, cat_id in enumerate(coco_eval.params.catIds):
        p = precision[:, :, k, 0, -1]
        p = p[p > -1]
        if p.size:
            out[names.get(cat_id, str(cat_id))] = float(np.mean(p))
    return out


def format_per_class(per_class: Mapping[str, float], columns: int = 3) -> str:
    """A compact table: ``columns`` (name, AP) pairs per row."""
    if not per_class:
        return "per-class AP: no category has ground truth in the evaluated images"
    width = max(len(name) for name in per_class)
    cells = [f"{name:<{width}} {ap:6.3f}" for name, ap in per_class.items()]
    rows = ["   ".join(cells[i:i + columns]) for i in range(0, len(cells), columns)]
    return "per-class AP @[IoU=0.50:0.95 | area=all | maxDets=100]\n" + "\n".join(rows)


class CocoEvaluator:
    """Collects detections during evaluation and scores them with ``COCOeval`` (bbox, and segm for
    predictions that carry masks).

    Usage: ``update()`` with each batch's predictions, ``synchronize()`` once at the end (on
    every process, it gathers detections under DDP), then ``summarize()`` on the main process.
    Only the images passed to ``update()`` are evaluated, so a partial pass over the dataset
    gives metrics for that part.
    """

    def __init__(self, coco_gt: COCO):
        self.coco_gt = coco_gt
        self.detections: Dict[int, List[dict]] = {}  # image id -> COCO results of that image
        self.segmentations: Dict[int, List[dict]] = {}  # image id -> COCO segmentation results, for masks
        self.coco_eval: Optional[COCOeval] = None
        self.coco_eval_segm: Optional[COCOeval] = None
        self.metrics: Optional[Dict] = None

    def update(self, predictions: Mapping[int, Mapping]) -> None:
        """Add ``{image_id: {scores (N,), labels (N,) category ids, boxes (N, 4) xyxy}}``, and for a
        segmentation model ``masks`` (N, H, W) bool (or ``segmentations``, their RLE, see
        :func:`encode_masks`).

        Boxes and masks are in pixels of the original image. An image seen again replaces its
        earlier detections.
        """
        for image_id, prediction in predictions.items():
            image_id = int(image_id)
            if image_id not in self.coco_gt.imgs:
                raise UsageError(f"image id {image_id} is not in the ground-truth annotations; predictions must "
                                 f"be keyed by the dataset's image ids (target['image_id'])")
            self.detections[image_id] = to_coco_results(image_id, prediction)
            if "masks" in prediction or "segmentations" in prediction:
                self.segmentations[image_id] = to_coco_segm_results(image_id, prediction)

    def synchronize(self) -> None:
        """Merge the detections of every process into each (DDP); duplicates of an image collapse."""
        merged: Dict[int, List[dict]] = {}
        merged_segm: Dict[int, List[dict]] = {}
        for boxes, masks in all_gather_object((self.detections, self.segmentations)):
            merged.update(boxes)
            merged_segm.update(masks)
        self.detections, self.segmentations = merged, merged_segm

    @property
    def image_ids(self) -> List[int]:
        return sorted(self.detections)

    def results(self) -> List[dict]:
        """Every detection in COCO results format, ordered by image id."""
        return [det for image_id in self.image_ids for det in self.detections[image_id]]

    def segm_results(self) -> List[dict]:
        """Every mask in COCO segmentation results format (RLE), ordered by image id."""
        return [det for image_id in sorted(self.segmentations) for det in self.segmentations[image_id]]

    def summarize(self, output_dir: Optional[Union[str, Path]] = None, verbose: bool = True) -> Dict:
        """Run COCOeval and return ``{AP, AP50, ..., ARl, per_class_AP: {name: AP}}``, and when the
        predictions carried masks the same of the masks with the prefix ``segm_`` (``segm_AP``, ...,
        ``segm_per_class_AP``).

        pycocotools reports -1 for an area range with no ground truth. With no detections at
        all every number is 0. ``verbose`` prints pycocotools' table and a per-class table;
        ``output_dir`` receives the files of :meth:`write`.
        """
        names = {cid: str(cat.get("name", cid)) for cid, cat in self.coco_gt.cats.items()}
        metrics, table, self.coco_eval = self._evaluate(self.results(), names, "bbox")
        if verbose:
            print(table)
            print(format_per_class(metrics["per_class_AP"]))
        if self.segmentations:
            segm, table, self.coco_eval_segm = self._evaluate(self.segm_results(), names, "segm")
            metrics.update({SEGM + k: v for k, v in segm.items()})
            if verbose:
                print("masks (segm):")
                print(table)
                print(format_per_class(segm["per_class_AP"]))
        self.metrics = metrics
        if output_dir is not None:
            self.write(output_dir)
        return metrics

    def write(self, output_dir: Union[str, Path]) -> None:
        """Write ``detections.json`` (COCO results format: boxes), for masks ``segm_detections.json``
        (COCO segmentation results: ``segmentation`` as RLE, ``score``, ``category_id``, ``image_id``,
        what ``COCO.loadRes`` reads for ``iouType="segm"``), then ``metrics.json`` into ``output_dir``."""
        if self.metrics is None:
            self.summarize(verbose=False)
        output_dir = Path(output_dir)
        atomic_write_json(output_dir / DETECTIONS_FILE, self.results())
        if self.segmentations:
            atomic_write_json(output_dir / SEGM_DETECTIONS_FILE, self.segm_results())
        atomic_write_json(output_dir / METRICS_FILE, self.metrics, indent=2)

    def _evaluate(self, results: List[dict], names: Mapping[int, str], iou_type: str):
        """``(metrics, pycocotools' table, the COCOeval)`` of ``results`` (``iou_type`` bbox or segm)."""
        if not results:
            return (*self._zeros(names), None)
        with contextlib.redirect_stdout(io.StringIO()):  # progress lines
            # loadRes adds keys to the dicts it is given; keep ours as written to detections.json
            coco_dt = self.coco_gt.loadRes([dict(r) for r in results])
            coco_eval = COCOeval(self.coco_gt, coco_dt, iouType=iou_type)
            coco_eval.params.imgIds = self.image_ids
            coco_eval.evaluate()
            coco_eval.accumulate()
        table = io.StringIO()
        with contextlib.redirect_stdout(table):
            coco_eval.summarize()
        metrics = {name: float(v) for name, v in zip(METRIC_NAMES, coco_eval.stats)}
        metrics["per_class_AP"] = per_class_ap(coco_eval, names)
        return metrics, table.getvalue().rstrip(), coco_eval

    def _zeros(self, names: Mapping[int, str]):
        # (getAnnIds with an empty imgIds list would return every annotation)
        ann_ids = self.coco_gt.getAnnIds(imgIds=self.image_ids, iscrowd=False) if self.image_ids else []
        cat_ids = sorted({ann["category_id"] for ann in self.coco_gt.loadAnns(ann_ids)})
        metrics = {name: 0.0 for name in METRIC_NAMES}
        metrics["per_class_AP"] = {names.get(c, str(c)): 0.0 for c in cat_ids}
        table = (f"CocoEvaluator: no detections on the {len(self.image_ids)} evaluated image(s); "
                 f"every metric is 0.")
        return metrics, table
