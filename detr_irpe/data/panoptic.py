"""COCO panoptic segmentation data: ``panoptic_{train,val}2017.json`` and its PNG folders.

Each annotation of the json describes one image: ``file_name`` names its PNG, whose colour gives
every pixel's segment id (``R + 256 G + 256^2 B``, 0 void), and ``segments_info`` lists the
segments (``id``, ``category_id``, ``iscrowd``, ``bbox``, ``area``), things and stuff alike;
``categories`` say which are things (``isthing``). Layout as official DETR reads it::

    root/train2017/*.jpg  root/val2017/*.jpg
    root/annotations/panoptic_train2017.json  root/annotations/panoptic_val2017.json
    root/panoptic_train2017/*.png  root/panoptic_val2017/*.png

Targets are official DETR's ``coco_panoptic`` ones: one entry per segment (crowd ones included),
``labels`` the category ids, ``masks`` the segments' pixels, ``boxes`` their pixels' extent.
"""
from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Dict, List, Optional, Tuple, Union

import numpy as np
import torch
from PIL import Image
from pycocotools.coco import COCO
from torchvision import tv_tensors

from ..panoptic_png import rgb_to_id
from .coco import SPLITS, CocoDetection, build_dataset, read_json, resolve
from .errors import AnnotationError, DatasetNotFoundError, ImageDecodeError
from .validate import Report, validate_panoptic_dict

if TYPE_CHECKING:
    from ..config import Config, DataConfig

PathLike = Union[str, Path]
_LISTED = 5


def read_png_ids(path: Path) -> np.ndarray:
    """The ``(H, W)`` int64 segment ids of a panoptic PNG; ``DatasetNotFoundError`` /
    ``ImageDecodeError`` naming the file."""
    if not path.is_file():
        raise DatasetNotFoundError(f"panoptic PNG not found: {path}. Check data.*_panoptic_folder; "
                                   f"`detr-irpe check-data` lists every missing one.")
    try:
        with Image.open(path) as png:
            return rgb_to_id(np.asarray(png.convert("RGB")))
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ImageDecodeError(f"cannot decode the panoptic PNG {path}: {e}. Replace the file.") from None


def check_panoptic_dict(data, source: PathLike) -> Report:
    """Raise ``AnnotationError`` listing every problem that makes ``data`` unusable as COCO panoptic
    ground truth; the :class:`Report` (warnings too) otherwise."""
    report = validate_panoptic_dict(data, str(source))
    if not report.structure_ok:
        raise AnnotationError(report.findings["structure"].describe())
    if report.errors:
        lines = "\n".join(f"  - {finding.describe()}" for finding in report.errors)
        raise AnnotationError(f"{source}: {len(report.errors)} kind(s) of problem make this panoptic annotation "
                              f"file unusable:\n{lines}\nEvery problem of the dataset: detr-irpe check-data "
                              f"--annotations {source} --images <image folder> --panoptic <PNG folder>")
    return report


def detection_view(data: dict) -> dict:
    """A COCO detection dict of the panoptic ``data``: one annotation per segment (ids from 1, the
    segment's ``bbox``, ``area``, ``iscrowd``; ``segment_id`` its id in the PNG), for box AP and
    the COCO index. The categories keep their ``isthing``."""
    annotations = []
    for ann in data["annotations"]:
        for segment in ann["segments_info"]:
            bbox = segment.get("bbox", [0, 0, 0, 0])
            annotations.append({"id": len(annotations) + 1, "image_id": ann["image_id"],
                                "category_id": segment["category_id"], "bbox": bbox,
                                "area": segment.get("area", bbox[2] * bbox[3]),
                                "iscrowd": int(segment.get("iscrowd", 0)), "segment_id": segment["id"]})
    return {"images": data["images"], "annotations": annotations, "categories": data["categories"]}


def is_thing_map(categories: List[dict]) -> Dict[int, bool]:
    """Category id -> whether it is a thing (``isthing`` 1), for :class:`~detr_irpe.models.PostProcessPanoptic`."""
    return {int(c["id"]): c.get("isthing", 1) == 1 for c in categories}


class CocoPanoptic(CocoDetection):
    """A COCO panoptic dataset: item ``i`` is ``(image, target)`` as :class:`CocoDetection` gives
    them, with targets built from the PNG as official DETR's ``coco_panoptic`` does:

    - ``labels`` (N,) the category ids of the image's N segments (things, stuff, crowd regions)
    - ``boxes`` the extent of each segment's pixels (normalised cxcywh after the transforms)
    - ``iscrowd`` (N,) int64 and ``area`` (N,) float from ``segments_info``
    - with ``masks``: ``masks`` (N, H, W) uint8, each segment's pixels, transformed with the image

    ``panoptic`` is the json (one annotation per image), ``png_dir`` its PNG folder. Only images
    with a panoptic annotation are items. ``self.coco`` indexes :func:`detection_view`, so box AP
    and everything :class:`CocoDetection` offers work; ``self.panoptic`` is the json as read.
    A listed segment absent from the PNG, or a PNG of another size than its image, makes the item
    fail with an error naming both.
    """

    def __init__(self, image_dir: PathLike, annotation_file: PathLike, png_dir: PathLike,
                 transforms: Optional[Callable] = None, cache_images: bool = False, masks: bool = True):
        self.image_dir, self.annotation_file, self.png_dir = Path(image_dir), Path(annotation_file), Path(png_dir)
        for path, what, key in ((self.annotation_file, "panoptic annotation file", "annotations"),
                                (self.image_dir, "image folder", "images"),
                                (self.png_dir, "panoptic PNG folder", "panoptic_folder")):
            if not (path.is_file() if key == "annotations" else path.is_dir()):
                raise DatasetNotFoundError(f"{what} not found: {path}. Set data.root and data.*_{key} "
                                           f"(layout in datasets/README.md).")
        self.panoptic = read_json(self.annotation_file)
        self.report = check_panoptic_dict(self.panoptic, self.annotation_file)
        self.coco = COCO()
        self.coco.dataset = detection_view(self.panoptic)
        with contextlib.redirect_stdout(io.StringIO()):
            self.coco.createIndex()
        self.by_image = {ann["image_id"]: ann for ann in self.panoptic["annotations"]}
        self.ids = sorted(set(self.by_image) & set(self.coco.imgs))
        if not self.ids:
            raise AnnotationError(f"{self.annotation_file}: no image has a panoptic annotation; the dataset is empty")
        self.transforms = transforms
        self.masks = masks
        self._decoded = {} if cache_images else None

    @property
    def is_thing_map(self) -> Dict[int, bool]:
        """Category id -> thing (True) or stuff (False)."""
        return is_thing_map(self.panoptic["categories"])

    def png_path(self, index: int) -> Path:
        return self.png_dir / self.by_image[self.ids[index]]["file_name"]

    def missing_png_files(self) -> List[Path]:
        """The PNGs of the items that do not exist (one folder listing)."""
        try:
            present = set(os.listdir(self.png_dir))
        except OSError:
            present = set()
        return [self.png_path(i) for i in range(len(self.ids)) if self.png_path(i).name not in present]

    def load_target(self, index: int, size: Tuple[int, int]) -> dict:
        """Target of item ``index`` for an image of ``size = (h, w)``, boxes absolute xyxy."""
        image_id = self.ids[index]
        h, w = size
        path = self.png_path(index)
        ids = read_png_ids(path)
        if ids.shape != (h, w):
            raise ImageDecodeError(f"panoptic PNG {path} is {ids.shape[1]}x{ids.shape[0]}, its image {image_id} "
                                   f"{w}x{h}: fix the json or the files")
        segments = self.by_image[image_id]["segments_info"]
        segment_ids = np.array([s["id"] for s in segments], dtype=np.int64)
        masks = torch.from_numpy(ids[None] == segment_ids[:, None, None])  # (N, h, w) bool
        empty = (~masks.flatten(1).any(1)).nonzero().flatten().tolist()
        if empty:
            raise AnnotationError(f"segment id(s) {segment_ids[empty].tolist()} of image {image_id} "
                                  f"({self.annotation_file}) are absent from {path}")
        target = {
            "boxes": tv_tensors.BoundingBoxes(masks_to_boxes(masks), format="XYXY", canvas_size=(h, w)),
            "labels": torch.tensor([s["category_id"] for s in segments], dtype=torch.int64),
            "area": torch.tensor([float(s.get("area", m)) for s, m in zip(segments, masks.flatten(1).sum(1).tolist())],
                                 dtype=torch.float32),
            "iscrowd": torch.tensor([int(s.get("iscrowd", 0)) for s in segments], dtype=torch.int64),
            "image_id": torch.tensor(image_id, dtype=torch.int64),
            "orig_size": torch.tensor([h, w], dtype=torch.int64),
        }
        if self.masks:
            target["masks"] = tv_tensors.Mask(masks.to(torch.uint8))
        return target


def masks_to_boxes(masks: torch.Tensor) -> torch.Tensor:
    """``(N, H, W)`` non-empty masks -> ``(N, 4)`` float ``(x1, y1, x2, y2)`` boxes around their
    pixels (``x2`` one past the last column, as COCO's bbox of a mask)."""
    if masks.shape[0] == 0:
        return torch.zeros(0, 4)
    (y1, y2), (x1, x2) = _extent(masks.any(2)), _extent(masks.any(1))
    return torch.stack([x1, y1, x2, y2], dim=1).float()


def _extent(hit: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(N, L)`` bool -> the first index of each row holding True, and one past its last."""
    index = torch.arange(hit.shape[1])
    return torch.where(hit, index, hit.shape[1]).min(1).values, torch.where(hit, index, -1).max(1).values + 1


def build_panoptic_dataset(cfg: "DataConfig", split: str, transforms: Optional[Callable] = None,
                           masks: bool = True) -> CocoPanoptic:
    """The ``train`` or ``val`` split of a COCO panoptic ``cfg`` (``data.dataset=coco_panoptic``),
    with its standard transforms unless given; every image and PNG file is there."""
    from .transforms import make_eval_transforms, make_train_transforms

    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    paths = {key: resolve(cfg.root, getattr(cfg, f"{split}_{key}")) for key in ("images", "annotations",
                                                                               "panoptic_folder")}
    if transforms is None:
        transforms = make_train_transforms(cfg) if split == "train" else make_eval_transforms(cfg)
    dataset = CocoPanoptic(paths["images"], paths["annotations"], paths["panoptic_folder"], transforms,
                           cache_images=cfg.cache_images, masks=masks)
    for missing, what, key in ((dataset.missing_image_files(), "images", "images"),
                               (dataset.missing_png_files(), "panoptic PNGs", "panoptic_folder")):
        if missing:
            shown = ", ".join(str(p) for p in missing[:_LISTED]) + (
                f" and {len(missing) - _LISTED} more" if len(missing) > _LISTED else "")
            raise DatasetNotFoundError(
                f"{len(missing)} of the {len(dataset)} {split} {what} of {paths['annotations']} are missing: {shown}. "
                f"Point data.{split}_{key} at the folder holding them; `detr-irpe check-data` checks every file")
    return dataset


def build_split(cfg: "DataConfig", split: str, transforms: Optional[Callable] = None,
                masks: bool = False) -> CocoDetection:
    """The ``split`` of the dataset ``cfg`` describes: COCO detection (:func:`~.coco.build_dataset`),
    or COCO panoptic (``data.dataset``); ``masks``: with the masks in the targets. The package
    exports it as ``detr_irpe.data.build_dataset``."""
    if cfg.dataset == "coco_panoptic":
        return build_panoptic_dataset(cfg, split, transforms, masks=masks)
    return build_dataset(cfg, split, transforms, masks=masks)


def build_config_datasets(cfg: "Config") -> Tuple[CocoDetection, CocoDetection]:
    """The ``train`` and ``val`` splits of ``cfg.data``, with masks when the model predicts them
    (exported as ``detr_irpe.data.build_train_val_datasets``)."""
    return (build_split(cfg.data, "train", masks=cfg.model.masks),
            build_split(cfg.data, "val", masks=cfg.model.masks))
