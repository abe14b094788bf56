"""Detections as the records a user reads: what ``Detector.predict``, ``OnnxDetector.predict`` and
``predict``'s ``detections.json`` hold (one function, so that the PyTorch and ONNX paths agree)."""
from __future__ import annotations

from typing import Dict, List

from torch import Tensor

from ..errors import UsageError
from ..evaluation import encode_masks

MASK_FORMATS = ("tensor", "rle")


def check_mask_format(masks: str) -> str:
    """``masks`` if it is one of :data:`MASK_FORMATS`, else a :class:`UsageError` naming them."""
    if masks not in MASK_FORMATS:
        raise UsageError(f"masks must be one of {', '.join(map(repr, MASK_FORMATS))}, got {masks!r}")
    return masks


def detection_records(detections: Dict[str, Tensor], threshold: float, categories: Dict[int, str],
                      masks: str = "tensor") -> List[dict]:
    """The detections scoring at least ``threshold``, best first, as
    ``{"box": [x1, y1, x2, y2], "score", "label", "name"}`` (box in the image's pixels), and for a
    segmentation model (``detections`` with ``masks``) ``"mask"``: the detection's mask over the
    image, as a ``(H, W)`` bool tensor (``masks="tensor"``) or as COCO RLE (``masks="rle"``:
    ``{"size": [H, W], "counts": str}``, JSON-ready; ``pycocotools.mask.decode`` gives it back)."""
    check_mask_format(masks)
    scores, labels, boxes = detections["scores"], detections["labels"], detections["boxes"]
    keep = (scores >= threshold).nonzero().flatten()
    keep = keep[scores[keep].argsort(descending=True)].tolist()
    records = [{"box": boxes[i].tolist(), "score": float(scores[i]), "label": int(labels[i]),
                "name": categories.get(int(labels[i]), str(int(labels[i])))} for i in keep]
    if "masks" in detections:
        kept = detections["masks"][keep]
        for record, mask in zip(records, encode_masks(kept) if masks == "rle" else kept):
            record["mask"] = mask
    return records
