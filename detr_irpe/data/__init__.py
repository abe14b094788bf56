"""COCO-format datasets, DETR augmentations, padded batching and the synthetic shapes data."""
from .check import check_dataset
from .coco import (CocoDetection, category_names, check_coco_dict, load_coco, normalize_target,
                   num_classes_from_annotations)
from .panoptic import CocoPanoptic, build_panoptic_dataset, is_thing_map
# the builders that read data.dataset: COCO detection (coco.build_dataset) or COCO panoptic
from .panoptic import build_config_datasets as build_train_val_datasets
from .panoptic import build_split as build_dataset
from .errors import AnnotationError, DataItemError, DataLoaderWorkerError, DatasetNotFoundError, ImageDecodeError
from .loader import ReportingDataLoader, build_dataloader, collate_fn, set_epoch
from .sampler import ResumableSampler, SeededDataset
from .synthetic import SHAPES, SyntheticLayout, ensure_synthetic_dataset
from .transforms import (IMAGENET_MEAN, IMAGENET_STD, RandomSizeCrop, denormalize, make_eval_transforms,
                         make_train_transforms)
from .validate import Report, validate_coco_dict

__all__ = [
    "AnnotationError", "CocoDetection", "CocoPanoptic", "build_panoptic_dataset", "is_thing_map", "DataItemError", "DataLoaderWorkerError", "DatasetNotFoundError",
    "IMAGENET_MEAN", "IMAGENET_STD", "ImageDecodeError", "RandomSizeCrop", "Report", "ReportingDataLoader",
    "ResumableSampler", "SHAPES", "SeededDataset", "SyntheticLayout",
    "build_dataloader", "build_dataset", "build_train_val_datasets", "category_names", "check_coco_dict",
    "check_dataset", "collate_fn", "denormalize", "ensure_synthetic_dataset", "load_coco", "make_eval_transforms",
    "make_train_transforms", "normalize_target", "num_classes_from_annotations", "set_epoch",
    "validate_coco_dict",
]
