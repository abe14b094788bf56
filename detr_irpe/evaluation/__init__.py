"""COCO box and mask evaluation (pycocotools, or a library with its exact numbers) with detections
gathered across processes, and the arrays behind the pictures that explain the AP."""
from .backends import BACKENDS, NOT_EXACT, Backend, resolve_backend
from .classes import ClassMismatchError, ClassMismatchWarning, class_mismatch
from .coco_eval import (METRIC_NAMES, SEGM, CocoEvaluator, all_gather_object, encode_masks, evaluate_detections,
                        format_per_class, infer_iou_type, load_annotations, load_results, per_class_ap,
                        to_coco_results, to_coco_segm_results)
from .panoptic import PanopticFormatError, PQStats, evaluate_panoptic

__all__ = ["BACKENDS", "METRIC_NAMES", "NOT_EXACT", "SEGM", "Backend", "ClassMismatchError", "ClassMismatchWarning",
           "CocoEvaluator", "all_gather_object", "class_mismatch", "encode_masks", "evaluate_detections",
           "format_per_class", "infer_iou_type", "load_annotations", "load_results", "per_class_ap",
           "resolve_backend", "to_coco_results", "to_coco_segm_results",
           "PanopticFormatError", "PQStats", "evaluate_panoptic"]  # panoptic quality (PQ)
