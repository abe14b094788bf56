"""COCO box evaluation (pycocotools) with detections gathered across processes."""
from .classes import ClassMismatchError, ClassMismatchWarning, class_mismatch
from .coco_eval import METRIC_NAMES, CocoEvaluator, all_gather_object, format_per_class, per_class_ap, to_coco_results

__all__ = ["METRIC_NAMES", "ClassMismatchError", "ClassMismatchWarning", "CocoEvaluator", "all_gather_object",
           "class_mismatch", "format_per_class", "per_class_ap", "to_coco_results"]
