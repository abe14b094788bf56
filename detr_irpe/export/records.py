"""Detections as the records a user reads: what ``Detector.predict``, ``OnnxDetector.predict`` and
``predict``'s ``detections.json`` hold (one function, so that the PyTorch and ONNX paths agree)."""
from __future__ import annotations

from typing import Dict, List

from torch import Tensor


def detection_records(detections: Dict[str, Tensor], threshold: float, categories: Dict[int, str]) -> List[dict]:
    """The detections scoring at least ``threshold``, best first, as
    ``{"box": [x1, y1, x2, y2], "score", "label", "name"}`` (box in the image's pixels)."""
    scores, labels, boxes = detections["scores"], detections["labels"], detections["boxes"]
    keep = (scores >= threshold).nonzero().flatten()
    keep = keep[scores[keep].argsort(descending=True)].tolist()
    return [{"box": boxes[i].tolist(), "score": float(scores[i]), "label": int(labels[i]),
             "name": categories.get(int(labels[i]), str(int(labels[i])))} for i in keep]
