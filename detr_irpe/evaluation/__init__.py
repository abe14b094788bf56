"""COCO box and mask evaluation (pycocotools) with detections gathered across processes."""
from .classes import ClassMismatchError, ClassMismatchWarning, class_mismatch
from .coco_eval import (METRIC_NAMES, SEGM, CocoEvaluator, all_gather_object, encode_masks, format_per_class,
                        per_class_ap, to_coco_results, to_coco_segm_results)

__all__ = ["METRIC_NAMES", "SEGM", "ClassMismatchError", "ClassMismatchWarning", "CocoEvaluator",
           "all_gather_object", "class_mismatch", "encode_masks", "format_per_class", "per_class_ap",
           "to_coco_results", "to_coco_segm_results"]
