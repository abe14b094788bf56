"""Pictures of a detector: boxes on images, attention maps, learned iRPE tables, training curves.

* :mod:`.boxes` — predicted / ground-truth boxes with class names and scores (and instance masks),
  panels with titles.
* :mod:`.forward` — one forward pass on one image, keeping what the pictures need.
* :mod:`.attention` — encoder self-attention of a pixel, decoder cross-attention per detection.
* :mod:`.rpe_tables` — the learned iRPE lookup tables of every encoder layer (matplotlib).
* :mod:`.curves` — losses, class error and AP over epochs from ``log.jsonl`` files (matplotlib).
Drawing only: what to draw comes from the caller (:mod:`detr_irpe.apps.pictures` turns a
checkpoint into these pictures). Only the box drawing is imported here; matplotlib is imported
by the modules that plot, when they plot.
"""
from .boxes import class_color, draw_detections, prediction_vs_ground_truth, save_png, side_by_side, titled_row

__all__ = ["class_color", "draw_detections", "prediction_vs_ground_truth", "save_png", "side_by_side", "titled_row"]
