"""COCO-format detection dataset, read with pycocotools.

Works for COCO itself and for any dataset in the same format: point the config at its
annotation json and image folder (see ``datasets/README.md``).
"""
from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Dict, List, Optional, Tuple, Union

import torch
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from torch import Tensor
from torchvision import tv_tensors
from torchvision.ops import box_convert

from .errors import AnnotationError, DataItemError, DatasetNotFoundError, ImageDecodeError
from .images import dataset_orientation, exif_orientation, pil_to_rgb
from .validate import Report, validate_coco_dict

if TYPE_CHECKING:
    from ..config import Config, DataConfig

PathLike = Union[str, Path]
SPLITS = ("train", "val")
_LISTED = 5  # missing files named in an error


def check_coco_dict(data, source: PathLike, image_dir: Optional[PathLike] = None, masks: bool = False) -> Report:
    """Raise ``AnnotationError`` listing every problem that makes ``data`` unusable as COCO ground truth
    (with ``masks``, as instance segmentation ground truth: every segmentation well-formed).

    Problems that the loader tolerates (boxes of zero or negative size or outside the image,
    boxes across the border, images without width/height) do not raise; they are in the
    returned :class:`~detr_irpe.data.validate.Report` and printed by ``tools/check_data.py``.
    """
    report = validate_coco_dict(data, str(source), masks=masks)
    if not report.structure_ok:
        raise AnnotationError(report.findings["structure"].describe())
    errors = report.errors
    if errors:
        lines = "\n".join(f"  - {finding.describe()}" for finding in errors)
        images = image_dir if image_dir is not None else "<image folder>"
        raise AnnotationError(
            f"{source}: {len(errors)} kind(s) of problem make this annotation file unusable:\n{lines}\n"
            f"Every problem of the dataset: python tools/check_data.py --annotations {source} --images {images}")
    return report


def _fill_defaults(data: dict) -> None:
    """``area`` (from the box) and ``iscrowd`` (0) where missing: pycocotools' COCOeval needs both."""
    for ann in data["annotations"]:
        if "area" not in ann:
            _, _, w, h = ann["bbox"]
            ann["area"] = float(w) * float(h) if w > 0 and h > 0 else 0.0
        ann.setdefault("iscrowd", 0)


def _require_annotation_file(path: Path) -> None:
    if not path.is_file():
        raise DatasetNotFoundError(
            f"annotation file not found: {path}. Set data.root and data.train_annotations / "
            f"data.val_annotations to a COCO instances json (layout in datasets/README.md).")


def read_json(path: PathLike):
    """The JSON value in ``path``; ``AnnotationError`` naming the file if it is not valid JSON."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, huge integers, deep nesting
        raise AnnotationError(f"{path} is not valid JSON ({type(e).__name__}: {e}). Expected a COCO instances "
                              f"file like annotations/instances_val2017.json.") from None


def read_coco(annotation_file: PathLike, image_dir: Optional[PathLike] = None,
              masks: bool = False) -> Tuple[COCO, Report]:
    """Read and validate a COCO detection json: an indexed ``pycocotools.coco.COCO`` and the
    :class:`~detr_irpe.data.validate.Report` of what the loader tolerates (dropped or clipped boxes).

    Raises ``AnnotationError`` listing every problem that would break training or evaluation
    (see :func:`check_coco_dict`; ``masks``: the segmentations too); ``image_dir`` only completes
    the hint in that message. Missing ``area`` / ``iscrowd`` are filled in (box area, 0).
    """
    path = Path(annotation_file)
    _require_annotation_file(path)
    data = read_json(path)
    report = check_coco_dict(data, path, image_dir, masks)
    _fill_defaults(data)
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # createIndex prints progress lines
        coco.createIndex()
    return coco, report


def load_coco(annotation_file: PathLike, image_dir: Optional[PathLike] = None) -> COCO:
    """:func:`read_coco` without the report."""
    return read_coco(annotation_file, image_dir)[0]


# what the loader does with the boxes validation warns about (see CocoDetection.load_target)
_DROPPED = {"bbox_negative": "with a negative width or height", "bbox_empty": "with zero width or height",
            "bbox_outside": "entirely outside their image"}


def dropped_boxes_note(report: Report, image_dir: Optional[PathLike] = None) -> Optional[str]:
    """One sentence on the boxes of ``report`` that loading drops or clips, or None if there are none."""
    dropped = [(report.findings[code].count, what) for code, what in _DROPPED.items()
               if code in report.findings and report.findings[code].count]
    clipped = report.findings["bbox_clipped"].count if "bbox_clipped" in report.findings else 0
    if not dropped and not clipped:
        return None
    parts = []
    if dropped:
        total = sum(count for count, _ in dropped)
        parts.append(f"{total} of its {report.num_annotations} boxes are dropped while loading ("
                     + ", ".join(f"{count} {what}" for count, what in dropped) + ")")
    if clipped:
        parts.append(f"{clipped} box{'es are' if clipped != 1 else ' is'} clipped to the image border")
    images = f" --images {image_dir}" if image_dir is not None else ""
    return f"{report.source}: {'; '.join(parts)}. `detr-irpe check-data --annotations {report.source}{images}` lists them"


def num_classes_from_annotations(annotations: Union[PathLike, COCO]) -> int:
    """``max category id + 1`` (DETR's convention: 91 for COCO), from a json path or a loaded COCO."""
    coco = annotations if isinstance(annotations, COCO) else load_coco(annotations)
    cat_ids = coco.getCatIds()
    if not cat_ids:
        raise AnnotationError("the annotation file has no categories, so the number of classes is unknown. "
                              "Add a 'categories' list or set model.num_classes.")
    return max(cat_ids) + 1


def category_names(coco: COCO) -> Dict[int, str]:
    """Category id -> name (the id as text where a category has no name)."""
    return {cid: str(cat.get("name", cid)) for cid, cat in coco.cats.items()}


def segmentation_to_rle(segmentation, height: int, width: int) -> dict:
    """A COCO ``segmentation`` as one RLE of a ``height x width`` image, as pycocotools' ``annToRLE``
    reads it: polygons (a list of ``[x1, y1, x2, y2, ...]``, merged), uncompressed RLE (``counts`` a
    list) or compressed RLE (``counts`` a string)."""
    if isinstance(segmentation, list):
        return mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    if isinstance(segmentation["counts"], list):
        return mask_utils.frPyObjects(segmentation, height, width)
    return segmentation


def segmentations_to_masks(segmentations: List, height: int, width: int) -> Tensor:
    """COCO segmentations as ``(N, height, width)`` uint8 masks (pycocotools' ``annToMask`` of each)."""
    if not segmentations:
        return torch.zeros(0, height, width, dtype=torch.uint8)
    masks = mask_utils.decode([segmentation_to_rle(s, height, width) for s in segmentations])  # (H, W, N)
    return torch.from_numpy(masks).permute(2, 0, 1).contiguous()


def normalize_target(target: dict, size: Tuple[int, int]) -> dict:
    """Turn a transformed target into the model's format.

    ``target["boxes"]`` (N, 4) absolute boxes in any ``tv_tensors.BoundingBoxes`` format become
    plain (N, 4) float (cx, cy, w, h) in [0, 1] relative to ``size = (h, w)``; ``size`` is added;
    ``masks`` (a ``tv_tensors.Mask``) become a plain (N, h, w) uint8 tensor.
    """
    out = dict(target)
    if "masks" in target:
        out["masks"] = target["masks"].as_subclass(Tensor)
    boxes = target["boxes"]
    fmt = boxes.format.name.lower() if isinstance(boxes, tv_tensors.BoundingBoxes) else "xyxy"
    boxes = box_convert(boxes.as_subclass(Tensor).float(), fmt, "cxcywh")
    h, w = size
    out["boxes"] = boxes / torch.tensor([w, h, w, h], dtype=boxes.dtype)
    out["size"] = torch.tensor([h, w], dtype=torch.int64)
    return out


class CocoDetection(torch.utils.data.Dataset):
    """A COCO-format detection dataset.

    Item ``i`` is ``(image, target)``. ``image`` is what ``transforms`` returns (with the
    standard transforms a float ``(3, H, W)`` tensor; without transforms a uint8 one). ``target``:

    - ``boxes``: (N, 4) float, normalised (cx, cy, w, h) relative to the returned image size
    - ``labels``: (N,) int64 COCO category ids (not contiguous indices)
    - ``image_id``: int64 scalar; ``orig_size``: (2,) int64 (h, w) of the file; ``size``: (2,) (h, w) now
    - ``area``: (N,) float, the annotation's area in original pixels; ``iscrowd``: (N,) int64 (all 0)
    - with ``masks=True``: ``masks``, (N, H, W) uint8, each box's instance mask at the returned
      image size (from its polygons or RLE, as pycocotools' ``annToMask``), transformed with the image

    Boxes are clipped to the image and degenerate ones dropped (with their masks). Crowd regions
    are left out of the targets (the evaluator reads them from the annotation file). Images
    without annotations are kept, with ``boxes`` of shape (0, 4) (and ``masks`` (0, H, W)).

    The annotation file is validated at construction (:func:`load_coco`): every problem that would
    break training is raised at once as ``AnnotationError``. An item that fails to load raises
    ``DatasetNotFoundError`` / ``ImageDecodeError`` (missing or bad image file) or
    ``DataItemError``, each naming the item, its image id and file.

    ``transforms`` is called as ``transforms(image, target)`` on a ``tv_tensors.Image`` and a target
    whose ``boxes`` are absolute xyxy ``tv_tensors.BoundingBoxes``, and returns the same pair.

    ``cache_images``: keep every decoded image (uint8) in memory after its first use, so that
    later epochs skip the file reading and decoding (each loader worker holds its own cache).

    ``masks``: add the instance masks to the targets (instance segmentation); the annotation
    file's segmentations are then validated too. Without it nothing reads them.
    """

    def __init__(self, image_dir: PathLike, annotation_file: PathLike,
                 transforms: Optional[Callable] = None, cache_images: bool = False, masks: bool = False):
        self.image_dir = Path(image_dir)
        self.annotation_file = Path(annotation_file)
        _require_annotation_file(self.annotation_file)  # both checks before the (slow) json load
        if not self.image_dir.is_dir():
            raise DatasetNotFoundError(
                f"image folder not found: {self.image_dir} (images of {self.annotation_file.name}). "
                f"Set data.root and data.train_images / data.val_images to the folder holding the images.")
        # refuses an empty dataset too
        self.coco, self.report = read_coco(self.annotation_file, self.image_dir, masks=masks)
        self.ids = sorted(self.coco.imgs)
        self.transforms = transforms
        self.masks = masks
        self._decoded: Optional[Dict[int, Tensor]] = {} if cache_images else None

    @property
    def num_classes(self) -> int:
        """Max category id + 1 (the model's ``num_classes``)."""
        return num_classes_from_annotations(self.coco)

    @property
    def categories(self) -> Dict[int, str]:
        """Category id -> name."""
        return category_names(self.coco)

    def __len__(self) -> int:
        return len(self.ids)

    def missing_image_files(self) -> List[Path]:
        """The listed image files that do not exist, found with one listing per folder (about a
        second for COCO train2017's 118k files, without opening any)."""
        listings: Dict[Path, set] = {}
        missing = []
        for image_id in self.ids:
            path = self.image_dir / self.coco.imgs[image_id]["file_name"]
            if path.parent not in listings:
                try:
                    listings[path.parent] = set(os.listdir(path.parent))
                except OSError:
                    listings[path.parent] = set()
            if path.name not in listings[path.parent]:
                missing.append(path)
        return missing

    def dropped_boxes_note(self) -> Optional[str]:
        """What loading drops or clips of this dataset's boxes (see :func:`dropped_boxes_note`)."""
        return dropped_boxes_note(self.report, self.image_dir)

    def load_image(self, index: int) -> tv_tensors.Image:
        """The image file of item ``index`` as a uint8 ``(3, H, W)`` RGB tensor, untransformed.

        Modes are converted as everywhere else (:func:`~.images.pil_to_rgb`). The stored pixels, EXIF
        orientation ignored (COCO's convention), unless the tag turns the image sideways and the json
        gives the turned size: then it is loaded as photo viewers show it (:func:`~.images.dataset_orientation`).
        """
        if self._decoded is not None and index in self._decoded:
            return tv_tensors.Image(self._decoded[index].clone())
        image_id = self.ids[index]
        info = self.coco.imgs[image_id]
        path = self.image_dir / info["file_name"]
        if not path.is_file():
            raise DatasetNotFoundError(
                f"image file not found: {path} (image id {image_id}, listed in {self.annotation_file}). "
                f"Check that data.*_images points at the right folder, or remove the image from the json.")
        try:
            with Image.open(path) as file:
                file.load()  # the EXIF of a PNG may follow its pixels
                json_wh = (info.get("width"), info.get("height"))
                image = pil_to_rgb(file, exif=dataset_orientation(exif_orientation(file), file.size, json_wh))
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            raise ImageDecodeError(f"cannot decode image {path} (image id {image_id}): {e}. "
                                   f"Replace the file or remove the image from {self.annotation_file}.") from None
        h, w = image.shape[-2:]
        if ("height" in info and info["height"] != h) or ("width" in info and info["width"] != w):
            raise ImageDecodeError(
                f"image {path} (image id {image_id}) is {w}x{h} pixels but {self.annotation_file} says "
                f"{info.get('width')}x{info.get('height')}; its boxes would be misplaced. Fix the json or the file.")
        if self._decoded is not None:
            self._decoded[index] = image.clone()
        return tv_tensors.Image(image)

    def load_target(self, index: int, size: Tuple[int, int]) -> dict:
        """Target of item ``index`` for an image of ``size = (h, w)``, boxes absolute xyxy."""
        image_id = self.ids[index]
        h, w = size
        anns = [a for a in self.coco.imgToAnns[image_id] if not a.get("iscrowd", 0)]
        # float64 until clipped: validated boxes are finite, so x + w cannot be NaN, and huge
        # values are clipped to the image before they could overflow float32
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float64).reshape(-1, 4)
        boxes = box_convert(boxes, "xywh", "xyxy")
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        boxes = boxes.float()
        area = [a.get("area", a["bbox"][2] * a["bbox"][3]) for a in anns]
        target = {
            "boxes": tv_tensors.BoundingBoxes(boxes[keep], format="XYXY", canvas_size=(h, w)),
            "labels": torch.tensor([a["category_id"] for a in anns], dtype=torch.int64)[keep],
            "area": torch.tensor(area, dtype=torch.float64).clamp(0, h * w).float()[keep],  # finite
            "iscrowd": torch.zeros(int(keep.sum()), dtype=torch.int64),
            "image_id": torch.tensor(image_id, dtype=torch.int64),
            "orig_size": torch.tensor([h, w], dtype=torch.int64),
        }
        if self.masks:
            kept = [a["segmentation"] for a, k in zip(anns, keep.tolist()) if k]
            target["masks"] = tv_tensors.Mask(segmentations_to_masks(kept, h, w))
        return target

    def ground_truth_sample(self, index: int) -> Tuple[str, Tensor, Dict[str, Tensor]]:
        """Item ``index`` as stored, for pictures: ``(file stem, (3, H, W) uint8 image,
        {"boxes": (N, 4) absolute xyxy, "labels": (N,)})``."""
        image = self.load_image(index).as_subclass(Tensor)
        target = self.load_target(index, tuple(image.shape[-2:]))
        stem = Path(self.coco.imgs[self.ids[index]]["file_name"]).stem
        return stem, image, {"boxes": target["boxes"].as_subclass(Tensor), "labels": target["labels"]}

    def describe_item(self, index: int) -> str:
        """``item 3 (image id 42, file /data/x.jpg)``: for messages about a failed item."""
        try:
            image_id = self.ids[index]
            return f"item {index} (image id {image_id}, file {self.image_dir / self.coco.imgs[image_id]['file_name']})"
        except (IndexError, TypeError, KeyError):
            return f"item {index!r} (not an index of this dataset of {len(self)} images)"

    def __getitem__(self, index: int):
        self.ids[index]  # IndexError past the end, unwrapped (the sequence protocol relies on it)
        try:
            image = self.load_image(index)
            target = self.load_target(index, tuple(image.shape[-2:]))
            if self.transforms is not None:
                image, target = self.transforms(image, target)
            target = normalize_target(target, tuple(image.shape[-2:]))
        except (DatasetNotFoundError, ImageDecodeError, MemoryError):
            raise  # the first two already name the file and the image id
        except Exception as e:
            raise DataItemError(
                f"loading {self.describe_item(index)} of {self.annotation_file} failed: {type(e).__name__}: {e}. "
                f"Check the dataset with tools/check_data.py, or debug with dataset[{index}].") from e
        return image.as_subclass(Tensor), target


def resolve(root: PathLike, path: PathLike) -> Path:
    """``path`` if absolute, else ``root / path``."""
    path = Path(path)
    return path if path.is_absolute() else Path(root) / path


def build_dataset(cfg: "DataConfig", split: str, transforms: Optional[Callable] = None,
                  masks: bool = False) -> CocoDetection:
    """The ``train`` or ``val`` split described by ``cfg``, with its standard transforms unless given
    (``masks``: with instance masks, see :class:`CocoDetection`)."""
    from .transforms import make_eval_transforms, make_train_transforms

    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    image_dir = resolve(cfg.root, getattr(cfg, f"{split}_images"))
    annotation_file = resolve(cfg.root, getattr(cfg, f"{split}_annotations"))
    if not annotation_file.is_file():
        raise DatasetNotFoundError(
            f"{split} annotation file not found: {annotation_file} (data.root={cfg.root!r}, "
            f"data.{split}_annotations={getattr(cfg, f'{split}_annotations')!r}). Download COCO or point "
            f"these keys at your own COCO-format json; see datasets/README.md.")
    if not image_dir.is_dir():
        raise DatasetNotFoundError(
            f"{split} image folder not found: {image_dir} (data.root={cfg.root!r}, "
            f"data.{split}_images={getattr(cfg, f'{split}_images')!r}). Point these keys at the folder "
            f"holding the images; see datasets/README.md.")
    if transforms is None:
        transforms = make_train_transforms(cfg) if split == "train" else make_eval_transforms(cfg)
    dataset = CocoDetection(image_dir, annotation_file, transforms, cache_images=cfg.cache_images, masks=masks)
    missing = dataset.missing_image_files()
    if missing:
        shown = ", ".join(str(p) for p in missing[:_LISTED]) + (f" and {len(missing) - _LISTED} more"
                                                              if len(missing) > _LISTED else "")
        raise DatasetNotFoundError(
            f"{len(missing)} of the {len(dataset)} {split} images listed in {annotation_file} are missing: {shown}. "
            f"Point data.{split}_images at the folder holding them, or remove them from the json; "
            f"`detr-irpe check-data --annotations {annotation_file} --images {image_dir}` checks every file")
    return dataset


def build_train_val_datasets(cfg: "Config") -> Tuple[CocoDetection, CocoDetection]:
    """The ``train`` and ``val`` splits of ``cfg.data``, each with its standard transforms, with
    instance masks when the model predicts them (``model.masks``)."""
    masks = cfg.model.masks
    return build_dataset(cfg.data, "train", masks=masks), build_dataset(cfg.data, "val", masks=masks)
