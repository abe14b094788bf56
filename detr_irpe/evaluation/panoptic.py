"""Panoptic quality (PQ, SQ, RQ) of COCO panoptic predictions, the standard definition (Kirillov
et al., 2019; the COCO panoptic challenge's ``pq_compute``) written in numpy.

Per category: a predicted and a ground-truth segment of that category match when their IoU is
above 0.5 (void pixels, id 0 of the ground truth, left out of the union); then

    PQ = sum of matched IoUs / (TP + FP/2 + FN/2),  SQ = sum of matched IoUs / TP,  RQ = TP / (TP + FP/2 + FN/2).

Crowd ground truth is neither matched nor a false negative, and an unmatched prediction lying
more than half in void, or in the crowd region of its category, is not a false positive. PQ of
All / Things / Stuff is the mean over the categories that occur (TP + FP + FN > 0).

The statistics add up over images (:class:`PQStats`), so processes each score their share and
the sums are merged (:meth:`PQStats.merge`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Union

import numpy as np
from PIL import Image

from ..errors import DetrIrpeError
from ..panoptic_png import rgb_to_id

PathLike = Union[str, Path]
VOID = 0
OFFSET = 256 ** 3  # larger than any segment id of an RGB PNG
MATCH_IOU = 0.5


class PanopticFormatError(DetrIrpeError, ValueError):
    """Panoptic ground truth or predictions are not in the COCO panoptic format; names the image and file."""


def read_segment_ids(path: PathLike) -> np.ndarray:
    """The ``(H, W)`` int64 segment ids of a COCO panoptic PNG."""
    path = Path(path)
    if not path.is_file():
        raise PanopticFormatError(f"panoptic PNG not found: {path}")
    try:
        with Image.open(path) as png:
            rgb = np.asarray(png.convert("RGB"))
    except (OSError, SyntaxError, ValueError) as e:
        raise PanopticFormatError(f"cannot decode the panoptic PNG {path}: {e}") from None
    return rgb_to_id(rgb)


@dataclass
class PQStats:
    """Per category: the sum of matched IoUs, TP, FP and FN (additive over images)."""

    iou: Dict[int, float] = field(default_factory=dict)
    tp: Dict[int, int] = field(default_factory=dict)
    fp: Dict[int, int] = field(default_factory=dict)
    fn: Dict[int, int] = field(default_factory=dict)

    def _add(self, table: dict, category: int, value) -> None:
        table[category] = table.get(category, 0) + value

    def merge(self, other: "PQStats") -> "PQStats":
        """Add ``other``'s counts to these (in place); returns self."""
        for name in ("iou", "tp", "fp", "fn"):
            for category, value in getattr(other, name).items():
                self._add(getattr(self, name), category, value)
        return self

    def add_image(self, gt_ids: np.ndarray, gt_segments: Sequence[Mapping], pred_ids: np.ndarray,
                  pred_segments: Sequence[Mapping], where: str = "image") -> None:
        """Count one image.

        Args:
            gt_ids, pred_ids: ``(H, W)`` integer segment ids (ground truth 0: void).
            gt_segments: ``{"id", "category_id", "iscrowd"?}`` of the ground truth segments.
            pred_segments: ``{"id", "category_id"}`` of the predicted ones; a predicted pixel whose id
                no segment has is an error unless it is 0 (unlabelled).
            where: names the image in error messages.
        """
        if gt_ids.shape != pred_ids.shape:
            raise PanopticFormatError(f"{where}: the predicted PNG is {pred_ids.shape[1]}x{pred_ids.shape[0]}, "
                                      f"the ground truth {gt_ids.shape[1]}x{gt_ids.shape[0]} (width x height)")
        gt = {int(s["id"]): s for s in gt_segments}
        pred = {int(s["id"]): s for s in pred_segments}
        gt_area = _areas(gt_ids, gt, "ground truth", where)
        pred_area = _areas(pred_ids, pred, "prediction", where)
        joint = gt_ids.astype(np.int64).ravel() * OFFSET + pred_ids.astype(np.int64).ravel()
        pairs, counts = np.unique(joint, return_counts=True)
        overlap = {(int(p // OFFSET), int(p % OFFSET)): int(c) for p, c in zip(pairs, counts)}
        matched_gt, matched_pred = set(), set()
        for (g, p), inter in overlap.items():
            if g not in gt or p not in pred or gt[g].get("iscrowd", 0) == 1:
                continue
            if gt[g]["category_id"] != pred[p]["category_id"]:
                continue
            union = pred_area[p] + gt_area[g] - inter - overlap.get((VOID, p), 0)
            iou = inter / union
            if iou > MATCH_IOU:
                category = int(gt[g]["category_id"])
                self._add(self.tp, category, 1)
                self._add(self.iou, category, iou)
                matched_gt.add(g)
                matched_pred.add(p)
        crowd: Dict[int, List[int]] = {}  # category -> its crowd segments (COCO has one per category and image)
        for g, segment in gt.items():
            if segment.get("iscrowd", 0) == 1:
                crowd.setdefault(int(segment["category_id"]), []).append(g)
            elif g not in matched_gt:
                self._add(self.fn, int(segment["category_id"]), 1)
        for p, segment in pred.items():
            if p in matched_pred:
                continue
            category = int(segment["category_id"])
            ignored = overlap.get((VOID, p), 0) + sum(overlap.get((g, p), 0) for g in crowd.get(category, []))
            if ignored / pred_area[p] > 0.5:
                continue
            self._add(self.fp, category, 1)

    def summarize(self, categories: Mapping[int, Mapping]) -> dict:
        """``{"All" | "Things" | "Stuff": {"pq", "sq", "rq", "n"}, "per_class": {id: {"pq", "sq", "rq"}}}``
        over ``categories`` (id -> entry with ``isthing``); ``n`` counts the categories that occur."""
        per_class, groups = {}, {"All": [], "Things": [], "Stuff": []}
        for category, info in sorted(categories.items()):
            tp, fp, fn = self.tp.get(category, 0), self.fp.get(category, 0), self.fn.get(category, 0)
            iou = self.iou.get(category, 0.0)
            if tp + fp + fn == 0:
                per_class[category] = {"pq": 0.0, "sq": 0.0, "rq": 0.0}
                continue
            denominator = tp + 0.5 * fp + 0.5 * fn
            scores = {"pq": iou / denominator, "sq": iou / tp if tp else 0.0, "rq": tp / denominator}
            per_class[category] = scores
            groups["All"].append(scores)
            groups["Things" if info.get("isthing", 1) == 1 else "Stuff"].append(scores)
        result = {name: {key: float(np.mean([s[key] for s in found])) if found else 0.0
                         for key in ("pq", "sq", "rq")} | {"n": len(found)}
                  for name, found in groups.items()}
        result["per_class"] = per_class
        return result


def _areas(ids: np.ndarray, segments: Mapping[int, Mapping], what: str, where: str) -> Dict[int, int]:
    """Pixel count of each segment of ``segments``; every id of the PNG must be listed (0 excepted)
    and every listed segment must be in the PNG."""
    values, counts = np.unique(ids, return_counts=True)
    area = {}
    for value, count in zip(values.tolist(), counts.tolist()):
        if value not in segments:
            if value == VOID:
                continue
            raise PanopticFormatError(f"{where}: the {what} PNG has segment id {value}, which its segments_info "
                                      f"does not list")
        area[value] = count
    absent = sorted(set(segments) - set(area))
    if absent:
        raise PanopticFormatError(f"{where}: segment id(s) {absent[:5]} of the {what}'s segments_info are not in "
                                  f"its PNG")
    return area


def _read_json(path: PathLike, what: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except OSError as e:
        raise PanopticFormatError(f"cannot read the panoptic {what} file {path}: {e}") from None
    except (ValueError, RecursionError) as e:
        raise PanopticFormatError(f"{path} is not valid JSON ({type(e).__name__}: {e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise PanopticFormatError(f"{path} is not a COCO panoptic {what} file: it needs an 'annotations' list "
                                  f"(one entry per image, with 'image_id', 'file_name' and 'segments_info')")
    return data


def _by_image(data: dict, path: PathLike) -> Dict[int, dict]:
    annotations = {}
    for position, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict) or not {"image_id", "file_name", "segments_info"} <= set(ann):
            raise PanopticFormatError(f"{path}: annotation #{position} lacks 'image_id', 'file_name' or "
                                      f"'segments_info'")
        annotations[ann["image_id"]] = ann
    return annotations


def evaluate_panoptic(gt_json: PathLike, gt_folder: PathLike, pred_json: PathLike, pred_folder: PathLike,
                      image_ids: Optional[Iterable[int]] = None) -> dict:
    """PQ / SQ / RQ of the predictions ``pred_json`` + ``pred_folder`` (COCO panoptic format: one
    annotation per image, its PNG in the folder) against the ground truth ``gt_json`` + ``gt_folder``.

    Every ground-truth image (or those of ``image_ids``) needs a prediction. Returns
    ``{"All": {"pq", "sq", "rq", "n"}, "Things": ..., "Stuff": ..., "per_class": {category_id:
    {"pq", "sq", "rq"}}}`` with values in [0, 1] (see :meth:`PQStats.summarize`).
    """
    gt_data, pred_data = _read_json(gt_json, "ground truth"), _read_json(pred_json, "predictions")
    categories = {c["id"]: c for c in gt_data.get("categories", [])}
    gt_anns, pred_anns = _by_image(gt_data, gt_json), _by_image(pred_data, pred_json)
    stats = PQStats()
    for image_id in (sorted(gt_anns) if image_ids is None else image_ids):
        if image_id not in pred_anns:
            raise PanopticFormatError(f"{pred_json} has no prediction for image {image_id}")
        gt_ann, pred_ann = gt_anns[image_id], pred_anns[image_id]
        for segment in pred_ann["segments_info"]:
            if segment["category_id"] not in categories:
                raise PanopticFormatError(f"{pred_json}: image {image_id} has a segment of category "
                                          f"{segment['category_id']}, which {gt_json} does not list")
        stats.add_image(read_segment_ids(Path(gt_folder) / gt_ann["file_name"]), gt_ann["segments_info"],
                        read_segment_ids(Path(pred_folder) / pred_ann["file_name"]), pred_ann["segments_info"],
                        where=f"image {image_id}")
    return stats.summarize(categories)


def format_pq(result: Mapping, names: Optional[Mapping[int, str]] = None) -> str:
    """The PQ table (All / Things / Stuff rows, then per class) as text."""
    lines = [f"{'':10s} {'PQ':>6s} {'SQ':>6s} {'RQ':>6s} {'N':>4s}"]
    for group in ("All", "Things", "Stuff"):
        g = result[group]
        lines.append(f"{group:10s} {100 * g['pq']:6.1f} {100 * g['sq']:6.1f} {100 * g['rq']:6.1f} {g['n']:4d}")
    per_class: List[str] = []
    for category, s in result.get("per_class", {}).items():
        name = (names or {}).get(category, str(category))
        per_class.append(f"{name}: {100 * s['pq']:.1f}")
    if per_class:
        lines.append("per class PQ: " + ", ".join(per_class))
    return "\n".join(lines)
