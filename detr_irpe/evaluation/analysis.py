"""The numbers behind the pictures that explain the AP, read from the evaluator's own arrays.

Nothing here matches detections to ground truth by itself: the precision-recall curves and the
per-size numbers are slices of ``COCOeval.eval`` (``precision``: ``(T, R, K, A, M)`` = IoU
thresholds x 101 recall thresholds x categories x area ranges x max-detection settings,
``recall``: ``(T, K, A, M)``, -1 where a category has no ground truth), and the confusion matrix
counts the ``evalImgs`` of a second, class-agnostic ``COCOeval`` run (``useCats=0``) of the
detections that score at least a threshold. Everything is returned as plain JSON-ready lists.
"""
from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Sequence

import numpy as np

from .backends import PYCOCOTOOLS, ULTRAFAST, Backend, run_cocoeval

AREAS = ("all", "small", "medium", "large")  # COCOeval's area ranges, in its order
PR_IOUS = (0.5, 0.75)
BACKGROUND = "background"


def _iou_index(coco_eval, iou: float) -> int:
    matches = np.flatnonzero(np.isclose(coco_eval.params.iouThrs, iou))
    if not matches.size:
        raise ValueError(f"IoU {iou} is not one of the evaluation's thresholds {list(coco_eval.params.iouThrs)}")
    return int(matches[0])


def _mean_valid(values: np.ndarray) -> Optional[float]:
    """pycocotools' mean over the entries that are not -1 (None where there are none)."""
    valid = values[values > -1]
    return float(np.mean(valid)) if valid.size else None


def pr_curves(coco_eval, iou: float) -> Dict[int, Optional[List[float]]]:
    """``{category id: precision at each of the 101 recall thresholds}`` at ``iou`` (area all, the
    largest max-detections setting); None for a category without ground truth."""
    precision = coco_eval.eval["precision"][_iou_index(coco_eval, iou), :, :, 0, -1]  # (R, K)
    return {int(cat): (None if (precision[:, k] <= -1).all() else [float(v) for v in precision[:, k]])
            for k, cat in enumerate(coco_eval.params.catIds)}


def size_breakdown(coco_eval) -> Dict[str, Dict[str, Optional[float]]]:
    """``{area: {AP, AP50, AP75, AR}}`` for all / small / medium / large objects (the largest
    max-detections setting): the same means that ``summarize()`` takes, None for an area without
    ground truth."""
    precision, recall = coco_eval.eval["precision"], coco_eval.eval["recall"]
    i50, i75 = _iou_index(coco_eval, 0.5), _iou_index(coco_eval, 0.75)
    return {area: {"AP": _mean_valid(precision[:, :, :, a, -1]), "AP50": _mean_valid(precision[i50, :, :, a, -1]),
                   "AP75": _mean_valid(precision[i75, :, :, a, -1]), "AR": _mean_valid(recall[:, :, a, -1])}
            for a, area in enumerate(AREAS)}


def confusion_matrix(backend: Backend, coco_gt, results: Sequence[Mapping], image_ids: Sequence[int],
                     cat_ids: Sequence[int], iou_type: str = "bbox", threshold: float = 0.5,
                     iou: float = 0.5) -> np.ndarray:
    """``(K + 1, K + 1)`` counts: row = the ground truth's category (``cat_ids`` order, then
    background: a detection that matched nothing), column = the detection's category (then
    background: a ground truth that nothing matched).

    The detections scoring at least ``threshold`` are matched to the ground truth of any category
    by COCOeval itself (``useCats=0``, area all, every detection of an image kept) at IoU ``iou``:
    greedily by score, each to the unmatched ground truth it overlaps most. Crowd regions and
    the detections that fall on them count nowhere, as in AP. ``coco_gt`` is the backend's
    ``COCO``; a backend that does not keep ``evalImgs`` leaves the matching to pycocotools.
    """
    index = {int(c): k for k, c in enumerate(cat_ids)}
    background = len(cat_ids)
    matrix = np.zeros((background + 1, background + 1), dtype=np.int64)
    kept = [r for r in results if r["score"] >= threshold and int(r["category_id"]) in index]
    if not kept:  # every ground truth missed (the libraries cannot load an empty result list)
        for ann in coco_gt.loadAnns(coco_gt.getAnnIds(imgIds=list(image_ids), catIds=list(cat_ids))):
            if not ann.get("iscrowd", 0) and not ann.get("ignore", 0):
                matrix[index[ann["category_id"]], background] += 1
        return matrix
    if backend not in (PYCOCOTOOLS, ULTRAFAST):
        backend = PYCOCOTOOLS  # (a COCO of another library works: the same API)
    per_image: Dict[int, int] = {}
    for r in kept:
        per_image[r["image_id"]] = per_image.get(r["image_id"], 0) + 1
    coco_eval = run_cocoeval(backend, coco_gt, kept, iou_type, image_ids, use_cats=False,
                             max_dets=[max(per_image.values())], eval_imgs=True)
    t = _iou_index(coco_eval, iou)
    gt_anns, dt_anns = coco_eval.cocoGt.anns, coco_eval.cocoDt.anns
    images = len(coco_eval.params.imgIds)
    for record in coco_eval.evalImgs[:images]:  # category -1 (all), area "all": the first block
        if record is None:
            continue
        for d, dt_id in enumerate(record["dtIds"]):
            if record["dtIgnore"][t][d]:
                continue
            gt_id = int(record["dtMatches"][t][d])
            row = index[gt_anns[gt_id]["category_id"]] if gt_id else background
            matrix[row, index[dt_anns[dt_id]["category_id"]]] += 1
        for g, gt_id in enumerate(record["gtIds"]):
            if not record["gtIgnore"][g] and not record["gtMatches"][t][g]:
                matrix[index[gt_anns[gt_id]["category_id"]], background] += 1
    return matrix


def analyze(coco_eval, names: Mapping[int, str], per_class: Mapping[str, float], confusion: np.ndarray,
            iou_type: str, threshold: float, iou: float = 0.5) -> dict:
    """Everything the pictures draw, JSON-ready: categories, the recall thresholds, PR curves at
    IoU 0.5 and 0.75, ``per_class`` AP, the per-size breakdown and the confusion matrix."""
    cat_ids = [int(c) for c in coco_eval.params.catIds]
    return {
        "iou_type": iou_type,
        "categories": [{"id": c, "name": names.get(c, str(c))} for c in cat_ids],
        "recall_thresholds": [float(r) for r in coco_eval.params.recThrs],
        "pr_curves": {f"{v:g}": {names.get(c, str(c)): p for c, p in pr_curves(coco_eval, v).items()}
                      for v in PR_IOUS},
        "per_class_AP": dict(per_class),
        "sizes": size_breakdown(coco_eval),
        "confusion": {"threshold": float(threshold), "iou": float(iou),
                      "labels": [names.get(c, str(c)) for c in cat_ids] + [BACKGROUND],
                      "matrix": confusion.tolist()},
    }
