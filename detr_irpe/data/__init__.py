"""COCO-format datasets, DETR augmentations, padded batching and the synthetic shapes data."""
from .coco import (CocoDetection, build_dataset, build_train_val_datasets, category_names, load_coco,
                   normalize_target, num_classes_from_annotations)
from .errors import AnnotationError, DatasetNotFoundError, ImageDecodeError
from .loader import build_dataloader, collate_fn, set_epoch
from .sampler import ResumableSampler, SeededDataset
from .synthetic import SHAPES, SyntheticLayout, ensure_synthetic_dataset
from .transforms import (IMAGENET_MEAN, IMAGENET_STD, RandomSizeCrop, denormalize, make_eval_transforms,
                         make_train_transforms)

__all__ = [
    "AnnotationError", "CocoDetection", "DatasetNotFoundError", "IMAGENET_MEAN", "IMAGENET_STD",
    "ImageDecodeError", "RandomSizeCrop", "ResumableSampler", "SHAPES", "SeededDataset", "SyntheticLayout",
    "build_dataloader", "build_dataset", "build_train_val_datasets", "category_names", "collate_fn",
    "denormalize", "ensure_synthetic_dataset", "load_coco", "make_eval_transforms",
    "make_train_transforms", "normalize_target", "num_classes_from_annotations", "set_epoch",
]
