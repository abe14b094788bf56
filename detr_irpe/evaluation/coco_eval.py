"""COCO box AP (and mask AP for a segmentation model), over detections gathered from every process,
computed by pycocotools or a library that gives its exact bits (:mod:`.backends`)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Union

import numpy as np
import torch
import torch.distributed as dist
from pycocotools import mask as mask_utils
from torchvision.ops import box_convert

from ..errors import InputNotFoundError, UsageError
from ..files import atomic_write_json
from .analysis import analyze, confusion_matrix
from .backends import Backend, describe, load_ground_truth, resolve_backend, run_cocoeval, summary_table

# The 12 numbers of COCOeval.summarize() for boxes, in its order.
METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
SEGM = "segm_"  # prefix of the mask metrics: segm_AP, ..., segm_ARl, segm_per_class_AP
DETECTIONS_FILE, SEGM_DETECTIONS_FILE, METRICS_FILE = "detections.json", "segm_detections.json", "metrics.json"
ANALYSIS_FILE = "analysis.json"  # the arrays behind the pictures (evaluation.analysis), per IoU type
IOU_TYPES = ("bbox", "segm")


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


def per_class_ap(coco_eval, names: Mapping[int, str]) -> Dict[str, float]:
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


def _category_names(coco_gt) -> Dict[int, str]:
    return {cid: str(cat.get("name", cid)) for cid, cat in coco_gt.cats.items()}


class CocoEvaluator:
    """Collects detections during evaluation and scores them with ``COCOeval`` (bbox, and segm for
    predictions that carry masks), computed by ``backend`` (see :func:`~.backends.resolve_backend`;
    ``auto``: the fastest installed library that gives pycocotools' exact numbers).

    Usage: ``update()`` with each batch's predictions, ``synchronize()`` once at the end (on
    every process, it gathers detections under DDP), then ``summarize()`` on the main process.
    Only the images passed to ``update()`` are evaluated, so a partial pass over the dataset
    gives metrics for that part. ``coco_gt``: the ground truth as a pycocotools ``COCO`` (the
    dataset's), any backend's ``COCO``, or an annotations dict.
    """

    def __init__(self, coco_gt, backend: str = "auto"):
        self.backend_asked = backend
        self.backend: Backend = resolve_backend(backend)
        if isinstance(coco_gt, dict):
            coco_gt = load_ground_truth(self.backend, coco_gt)
        self.coco_gt = coco_gt
        self._backend_gt = None  # the backend's COCO of the ground truth, built when first needed
        self.detections: Dict[int, List[dict]] = {}  # image id -> COCO results of that image
        self.segmentations: Dict[int, List[dict]] = {}  # image id -> COCO segmentation results, for masks
        self.coco_evals: Dict[str, object] = {}  # iou type -> the accumulated COCOeval of the last summarize()
        self.metrics: Optional[Dict] = None

    @property
    def coco_eval(self):
        return self.coco_evals.get("bbox")

    @property
    def coco_eval_segm(self):
        return self.coco_evals.get("segm")

    @property
    def backend_gt(self):
        """The ground truth as the backend's ``COCO``."""
        if self._backend_gt is None:
            coco_cls, _ = self.backend.classes()
            self._backend_gt = (self.coco_gt if isinstance(self.coco_gt, coco_cls)
                                else load_ground_truth(self.backend, self.coco_gt.dataset))
        return self._backend_gt

    def _check_image(self, image_id: int) -> int:
        image_id = int(image_id)
        if image_id not in self.coco_gt.imgs:
            raise UsageError(f"image id {image_id} is not in the ground-truth annotations; predictions must "
                             f"be keyed by the dataset's image ids (target['image_id'])")
        return image_id

    def update(self, predictions: Mapping[int, Mapping]) -> None:
        """Add ``{image_id: {scores (N,), labels (N,) category ids, boxes (N, 4) xyxy}}``, and for a
        segmentation model ``masks`` (N, H, W) bool (or ``segmentations``, their RLE, see
        :func:`encode_masks`).

        Boxes and masks are in pixels of the original image. An image seen again replaces its
        earlier detections.
        """
        for image_id, prediction in predictions.items():
            image_id = self._check_image(image_id)
            self.detections[image_id] = to_coco_results(image_id, prediction)
            if "masks" in prediction or "segmentations" in prediction:
                self.segmentations[image_id] = to_coco_segm_results(image_id, prediction)

    def add_results(self, results: Sequence[Mapping], iou_type: str = "bbox",
                    image_ids: Optional[Sequence[int]] = None) -> None:
        """Add detections already in COCO results format (``iou_type`` bbox: ``bbox`` xywh; segm:
        ``segmentation`` RLE), to be evaluated on ``image_ids`` (default: every image of the
        ground truth, so an image without detections counts its objects as missed)."""
        key = {"bbox": "bbox", "segm": "segmentation"}[_check_iou_type(iou_type)]
        by_image: Dict[int, List[dict]] = {int(i): [] for i in (self.coco_gt.imgs if image_ids is None else image_ids)}
        for n, result in enumerate(results):
            missing = [k for k in ("image_id", "category_id", "score", key) if k not in result]
            if missing:
                raise UsageError(f"result {n} has no {', '.join(missing)}: COCO {iou_type} results need image_id, "
                                 f"category_id, score and {key} (got keys {sorted(result)})")
            image_id = self._check_image(result["image_id"])
            by_image.setdefault(image_id, []).append(result)
        for image_id in by_image:
            self._check_image(image_id)
        target = self.detections if iou_type == "bbox" else self.segmentations
        target.update(by_image)

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

    def summarize(self, output_dir: Optional[Union[str, Path]] = None, verbose: bool = True,
                  iou_types: Optional[Sequence[str]] = None) -> Dict:
        """Run COCOeval and return ``{AP, AP50, ..., ARl, per_class_AP: {name: AP}, backend}``, and
        when the predictions carried masks the same of the masks with the prefix ``segm_`` (``segm_AP``,
        ..., ``segm_per_class_AP``). ``iou_types``: default bbox, and segm when there are masks.

        pycocotools reports -1 for an area range with no ground truth. With no detections at
        all every number is 0. ``verbose`` prints which library computes the AP, pycocotools' table
        and a per-class table; ``output_dir`` receives the files of :meth:`write`.
        """
        if iou_types is None:
            iou_types = ("bbox", "segm") if self.segmentations else ("bbox",)
        names = _category_names(self.coco_gt)
        metrics: Dict = {}
        if verbose:
            print(describe(self.backend, self.backend_asked))
        for iou_type in map(_check_iou_type, iou_types):
            results = self.results() if iou_type == "bbox" else self.segm_results()
            image_ids = self.image_ids if iou_type == "bbox" or self.detections else sorted(self.segmentations)
            scored, table, self.coco_evals[iou_type] = self._evaluate(results, image_ids, names, iou_type)
            prefix = SEGM if iou_type == "segm" else ""
            metrics.update({prefix + k: v for k, v in scored.items()})
            if verbose:
                if iou_type == "segm":
                    print("masks (segm):")
                print(table)
                print(format_per_class(scored["per_class_AP"]))
        metrics["backend"] = self.backend.name
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

    def analysis(self, threshold: float = 0.5) -> Dict[str, dict]:
        """``{iou type: what the pictures draw}`` (see :func:`~.analysis.analyze`) of the last
        :meth:`summarize`, the confusion matrix of the detections scoring at least ``threshold``;
        an IoU type without detections is left out."""
        names = _category_names(self.coco_gt)
        out = {}
        for iou_type, coco_eval in self.coco_evals.items():
            if coco_eval is None:
                continue
            results = self.results() if iou_type == "bbox" else self.segm_results()
            confusion = confusion_matrix(self.backend, self.backend_gt, results, coco_eval.params.imgIds,
                                         coco_eval.params.catIds, iou_type, threshold)
            per_class = self.metrics[(SEGM if iou_type == "segm" else "") + "per_class_AP"]
            out[iou_type] = analyze(coco_eval, names, per_class, confusion, iou_type, threshold)
        return out

    def write_analysis(self, output_dir: Union[str, Path], threshold: float = 0.5) -> Dict[str, dict]:
        """Write :meth:`analysis` as ``analysis.json`` into ``output_dir``; returns it."""
        analysis = self.analysis(threshold)
        atomic_write_json(Path(output_dir) / ANALYSIS_FILE, analysis)
        return analysis

    def _evaluate(self, results: List[dict], image_ids: List[int], names: Mapping[int, str], iou_type: str):
        """``(metrics, pycocotools' table, the COCOeval)`` of ``results`` (``iou_type`` bbox or segm)."""
        if not results:
            return (*self._zeros(image_ids, names), None)
        coco_eval = run_cocoeval(self.backend, self.backend_gt, results, iou_type, image_ids)
        table = summary_table(coco_eval)
        metrics = {name: float(v) for name, v in zip(METRIC_NAMES, coco_eval.stats)}
        metrics["per_class_AP"] = per_class_ap(coco_eval, names)
        return metrics, table, coco_eval

    def _zeros(self, image_ids: List[int], names: Mapping[int, str]):
        # (getAnnIds with an empty imgIds list would return every annotation)
        ann_ids = self.coco_gt.getAnnIds(imgIds=image_ids, iscrowd=False) if image_ids else []
        cat_ids = sorted({ann["category_id"] for ann in self.coco_gt.loadAnns(ann_ids)})
        metrics = {name: 0.0 for name in METRIC_NAMES}
        metrics["per_class_AP"] = {names.get(c, str(c)): 0.0 for c in cat_ids}
        table = (f"CocoEvaluator: no detections on the {len(image_ids)} evaluated image(s); "
                 f"every metric is 0.")
        return metrics, table


def _check_iou_type(iou_type: str) -> str:
    if iou_type not in IOU_TYPES:
        raise UsageError(f"iou_type must be bbox or segm, got {iou_type!r}")
    return iou_type


def _read_json(path: Union[str, Path], what: str):
    path = Path(path).expanduser()
    if not path.is_file():
        raise InputNotFoundError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"{what} {path} is not valid JSON: {e}") from None


def load_annotations(annotations: Union[str, Path, dict]) -> dict:
    """A COCO annotations dict from a path or a dict (checked to have images, annotations, categories)."""
    data = annotations if isinstance(annotations, dict) else _read_json(annotations, "annotations file")
    missing = [k for k in ("images", "annotations", "categories") if not isinstance(data, dict) or k not in data]
    if missing:
        raise UsageError(f"the annotations have no {', '.join(missing)}: a COCO instances file (such as "
                         f"instances_val2017.json) is a mapping with images, annotations and categories")
    return data


def load_results(results: Union[str, Path, Sequence[Mapping]]) -> List[dict]:
    """COCO result dicts from a path (a JSON list, as ``detections.json``) or a list."""
    data = _read_json(results, "results file") if isinstance(results, (str, Path)) else results
    if not isinstance(data, (list, tuple)) or not all(isinstance(r, Mapping) for r in data):
        raise UsageError("the results must be a list of COCO result dicts (image_id, category_id, bbox or "
                         "segmentation, score), as detections.json holds")
    return list(data)


def infer_iou_type(results: Sequence[Mapping]) -> str:
    """segm for results that carry a ``segmentation`` and no ``bbox``, else bbox."""
    return "segm" if results and "segmentation" in results[0] and "bbox" not in results[0] else "bbox"


def evaluate_detections(annotations: Union[str, Path, dict], results: Union[str, Path, Sequence[Mapping]], *,
                        backend: str = "auto", iou_type: str = "bbox") -> dict:
    """COCO AP of ``results`` (a path or a list of COCO result dicts) against ``annotations`` (a path
    or a COCO dict) on every image of the annotations: exactly what ``metrics.json`` holds, the 12
    numbers by name, ``per_class_AP`` and ``backend`` (for ``iou_type="segm"`` the numbers and
    per-class AP prefixed ``segm_``). ``detr-irpe eval --results ... --annotations ...`` calls it."""
    evaluator = CocoEvaluator(load_annotations(annotations), backend=backend)
    evaluator.add_results(load_results(results), _check_iou_type(iou_type))
    return evaluator.summarize(verbose=False, iou_types=(iou_type,))
