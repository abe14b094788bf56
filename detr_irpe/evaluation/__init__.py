"""COCO box evaluation (pycocotools) with detections gathered across processes."""
from .coco_eval import METRIC_NAMES, CocoEvaluator, all_gather_object, format_per_class, per_class_ap, to_coco_results

__all__ = ["METRIC_NAMES", "CocoEvaluator", "all_gather_object", "format_per_class", "per_class_ap",
           "to_coco_results"]
