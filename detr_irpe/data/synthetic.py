"""Synthetic shapes: a small COCO-format detection dataset generated on the fly and cached.

Coloured squares, circles, triangles, crosses and stars on noisy textured backgrounds, written
as real COCO json plus JPEG files, so training and evaluation run the same code as on COCO.
Each object has its box, its area and, as ``segmentation``, its exact pixel mask (COCO RLE, the
whole shape as drawn, also where a later shape covers part of it, like its box)::

    root/
      manifest.json                  generation parameters (the cache key)
      annotations/instances_train.json
      annotations/instances_val.json
      train/000000.jpg ...
      val/000000.jpg ...

Every image is drawn from its own generator seeded by ``(seed, split, index)``, so the output
is the same bytes for the same parameters, whatever order images are produced in.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Sequence, Tuple, Union

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils

from ..errors import UsageError
from .errors import DataRootInUseError

SHAPES = ("square", "circle", "triangle", "cross", "star")
# bump when the files change, so cached copies are regenerated (2: masks added; images and boxes as in 1)
GENERATOR_VERSION = 2
MANIFEST = "manifest.json"

MIN_SIZE, MAX_SIZE = 0.15, 0.5  # object extent as a fraction of the image side
MAX_OVERLAP = 0.3  # a new box may cover at most this fraction of itself or of an earlier box
PLACEMENT_TRIES = 20
MIN_COLOR_DISTANCE = 100.0  # RGB distance between an object and the background's mean colour
JPEG_QUALITY = 90


# The panoptic variant's stuff: horizontal bands, each class with its own colour (jittered, textured)
STUFF = {"sky": (90, 140, 220), "grass": (70, 150, 60), "sand": (215, 190, 125)}
MIN_BAND = 0.2  # a band's height, at least, as a fraction of the image side
MAX_BANDS = 3


@dataclass(frozen=True)
class SyntheticSpec:
    """Everything that determines the generated files."""

    num_train: int
    num_val: int
    image_size: int
    seed: int
    max_objects: int
    shapes: Tuple[str, ...]
    version: int = GENERATOR_VERSION
    panoptic: bool = False  # the panoptic variant (stuff bands + shapes as things, PNGs): a separate root


@dataclass(frozen=True)
class SyntheticLayout:
    """Where a generated dataset lives; field names match ``DataConfig`` (paths relative to root).

    ``generated`` says whether this call wrote the files (False: reused the cached copy).
    """

    root: str
    train_images: str = "train"
    train_annotations: str = "annotations/instances_train.json"
    val_images: str = "val"
    val_annotations: str = "annotations/instances_val.json"
    num_classes: int = len(SHAPES) + 1
    generated: bool = False
    panoptic: bool = False  # then *_annotations are COCO panoptic json and *_panoptic_folder their PNGs
    train_panoptic_folder: str = "panoptic_train"
    val_panoptic_folder: str = "panoptic_val"

    def config_overrides(self) -> List[str]:
        """``data.*=...`` override strings pointing a config at this dataset."""
        keys = ("root", "train_images", "train_annotations", "val_images", "val_annotations")
        if self.panoptic:
            keys += ("train_panoptic_folder", "val_panoptic_folder")
            return [f"data.{k}={getattr(self, k)}" for k in keys] + ["data.dataset=coco_panoptic"]
        return [f"data.{k}={getattr(self, k)}" for k in keys]


# --- drawing ---------------------------------------------------------------------------------

def _regular_polygon(n: int, radius: float, angle: float, cx: float, cy: float) -> List[Tuple[float, float]]:
    t = angle + 2 * math.pi * np.arange(n) / n
    return list(zip(cx + radius * np.cos(t), cy + radius * np.sin(t)))


def _star(radius: float, angle: float, cx: float, cy: float) -> List[Tuple[float, float]]:
    t = angle + math.pi * np.arange(10) / 5
    r = np.where(np.arange(10) % 2 == 0, radius, 0.45 * radius)
    return list(zip(cx + r * np.cos(t), cy + r * np.sin(t)))


def _cross(radius: float, angle: float, cx: float, cy: float) -> List[Tuple[float, float]]:
    a, b = radius, 0.35 * radius  # arm half-length, arm half-width
    pts = np.array([(b, a), (b, b), (a, b), (a, -b), (b, -b), (b, -a),
                    (-b, -a), (-b, -b), (-a, -b), (-a, b), (-b, b), (-b, a)])
    c, s = math.cos(angle), math.sin(angle)
    rot = pts @ np.array([[c, s], [-s, c]])
    return list(zip(cx + rot[:, 0], cy + rot[:, 1]))


def _draw_shape(mask: ImageDraw.ImageDraw, shape: str, radius: float, angle: float, cx: float, cy: float) -> None:
    """Fill ``shape`` (inscribed in the circle of ``radius`` around (cx, cy)) with 255 on ``mask``."""
    if shape == "circle":
        mask.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=255)
    elif shape == "square":
        mask.polygon(_regular_polygon(4, radius, angle, cx, cy), fill=255)
    elif shape == "triangle":
        mask.polygon(_regular_polygon(3, radius, angle, cx, cy), fill=255)
    elif shape == "cross":
        mask.polygon(_cross(radius, angle, cx, cy), fill=255)
    elif shape == "star":
        mask.polygon(_star(radius, angle, cx, cy), fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}; choose from {SHAPES}")


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """(size, size, 3) float: a random colour with a smooth low-frequency texture."""
    base = rng.uniform(30, 225, size=3)
    coarse = rng.normal(0, 25, size=(4, 4, 3))
    smooth = np.stack([np.asarray(Image.fromarray(coarse[..., c].astype(np.float32))
                                  .resize((size, size), Image.BILINEAR)) for c in range(3)], axis=-1)
    return base + smooth


def _overlap_ok(box: Tuple[int, int, int, int], placed: Sequence[Tuple[int, int, int, int]]) -> bool:
    x0, y0, x1, y1 = box
    area = (x1 - x0) * (y1 - y0)
    for u0, v0, u1, v1 in placed:
        inter = max(0, min(x1, u1) - max(x0, u0)) * max(0, min(y1, v1) - max(y0, v0))
        if inter > MAX_OVERLAP * area or inter > MAX_OVERLAP * (u1 - u0) * (v1 - v0):
            return False
    return True


def _distinct_colour(rng: np.random.Generator, avoid: Sequence[np.ndarray]) -> np.ndarray:
    """A random RGB colour at least ``MIN_COLOR_DISTANCE`` from each colour of ``avoid``."""
    while True:
        colour = rng.uniform(0, 255, size=3)
        if min(np.linalg.norm(colour - c) for c in avoid) >= MIN_COLOR_DISTANCE:
            return colour


def _place_shape(rng: np.random.Generator, size: int, shapes: Sequence[str], placed: List[tuple]):
    """``(label, mask (an "L" image), box)`` of a shape whose box overlaps those ``placed`` by at most
    ``MAX_OVERLAP``, drawn in up to ``PLACEMENT_TRIES`` tries; None when none fits."""
    for _ in range(PLACEMENT_TRIES):
        label = int(rng.integers(len(shapes)))
        radius = rng.uniform(MIN_SIZE, MAX_SIZE) * size / 2
        cx, cy = rng.uniform(radius, size - radius, size=2)
        mask = Image.new("L", (size, size), 0)
        _draw_shape(ImageDraw.Draw(mask), shapes[label], radius, rng.uniform(0, 2 * math.pi), cx, cy)
        box = mask.getbbox()
        if box is not None and _overlap_ok(box, placed):
            return label, mask, box
    return None


def draw_image(rng: np.random.Generator, size: int, shapes: Sequence[str],
               max_objects: int) -> Tuple[Image.Image, List[Dict]]:
    """One ``size`` x ``size`` RGB image and its objects ``{category_id, bbox (xywh), area, segmentation}``.

    1 to ``max_objects`` shapes (category id = 1 + index in ``shapes``); each box is the tight
    box of the drawn pixels and overlaps any other by at most ``MAX_OVERLAP``; ``area`` counts
    those pixels and ``segmentation`` is their mask (:func:`mask_rle`).
    """
    background = _background(rng, size)
    mean_colour = background.reshape(-1, 3).mean(0)
    image = Image.fromarray(np.clip(background, 0, 255).astype(np.uint8))
    objects, placed = [], []
    for _ in range(int(rng.integers(1, max_objects + 1))):
        found = _place_shape(rng, size, shapes, placed)
        if found is None:
            continue  # no room for another object
        label, mask, box = found
        colour = _distinct_colour(rng, [mean_colour])
        image.paste(tuple(int(c) for c in colour), mask=mask)
        x0, y0, x1, y1 = box
        placed.append(box)
        pixels = np.asarray(mask) > 0
        objects.append({"category_id": label + 1, "bbox": [x0, y0, x1 - x0, y1 - y0],
                        "area": int(np.count_nonzero(pixels)), "segmentation": mask_rle(pixels)})
    noisy = np.asarray(image, dtype=np.float32) + rng.normal(0, rng.uniform(4, 12), size=(size, size, 3))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)), objects


def mask_rle(pixels: np.ndarray) -> dict:
    """A ``(H, W)`` bool mask as COCO's compressed RLE, ``{"size": [H, W], "counts": str}`` (exact,
    unlike a polygon, which pycocotools would rasterise a little differently from PIL)."""
    rle = mask_utils.encode(np.asfortranarray(pixels.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def _bands(rng: np.random.Generator, size: int) -> List[Tuple[int, int, int]]:
    """1 to :data:`MAX_BANDS` horizontal bands ``(top, bottom, stuff index)`` covering the image,
    each at least :data:`MIN_BAND` of its height, neighbours of different classes."""
    count = int(rng.integers(1, MAX_BANDS + 1))
    free = size - count * int(MIN_BAND * size)
    cuts = np.sort(rng.integers(0, free + 1, size=count - 1))
    heights = np.diff(np.concatenate([[0], cuts, [free]])) + int(MIN_BAND * size)
    heights[-1] += size - heights.sum()
    bands, top, previous = [], 0, -1
    for height in heights:
        label = int(rng.choice([k for k in range(len(STUFF)) if k != previous]))
        bands.append((top, top + int(height), label))
        top, previous = top + int(height), label
    return bands


def draw_panoptic_image(rng: np.random.Generator, size: int, shapes: Sequence[str],
                        max_objects: int) -> Tuple[Image.Image, np.ndarray, List[Dict]]:
    """One image of the panoptic variant: stuff bands (:data:`STUFF`) as the background, shapes on
    top as things (each segment its visible pixels; later shapes cover earlier ones).

    Returns the RGB image, the ``(size, size)`` int64 segment ids (every pixel labelled) and the
    segments ``{id, category_id, iscrowd, bbox (xywh), area}``: thing category ids ``1..len(shapes)``,
    stuff ``len(shapes) + 1 + index in STUFF`` (one segment per stuff class present)."""
    colours = list(STUFF.values())
    picture = np.zeros((size, size, 3))
    stuff_of = np.zeros((size, size), dtype=np.int64)
    used_colours = []
    for top, bottom, label in _bands(rng, size):
        colour = np.array(colours[label]) + rng.uniform(-20, 20, size=3)
        texture = _background(rng, size) - 127.5  # the smooth texture around 0
        picture[top:bottom] = np.clip(colour + 0.4 * texture[top:bottom], 0, 255)
        stuff_of[top:bottom] = label
        used_colours.append(colour)
    image = Image.fromarray(picture.astype(np.uint8))
    owner = np.full((size, size), -1, dtype=np.int64)  # thing index per pixel, -1: stuff
    things, placed = [], []
    for _ in range(int(rng.integers(1, max_objects + 1))):
        found = _place_shape(rng, size, shapes, placed)
        if found is None:
            continue  # no room for another object
        label, mask, box = found
        colour = _distinct_colour(rng, used_colours)
        image.paste(tuple(int(c) for c in colour), mask=mask)
        placed.append(box)
        owner[np.asarray(mask) > 0] = len(things)
        things.append(label + 1)
    noisy = np.asarray(image, dtype=np.float32) + rng.normal(0, rng.uniform(4, 12), size=(size, size, 3))
    ids = np.zeros((size, size), dtype=np.int64)
    segments = []

    def add(pixels: np.ndarray, category_id: int) -> None:
        ys, xs = np.nonzero(pixels)
        if not len(ys):  # a shape covered entirely by later ones
            return
        segment_id = len(segments) + 1
        ids[pixels] = segment_id
        x0, y0 = int(xs.min()), int(ys.min())
        segments.append({"id": segment_id, "category_id": category_id, "iscrowd": 0,
                         "bbox": [x0, y0, int(xs.max()) + 1 - x0, int(ys.max()) + 1 - y0], "area": int(len(ys))})

    for label in range(len(STUFF)):
        add((owner < 0) & (stuff_of == label), len(shapes) + 1 + label)
    for index, category_id in enumerate(things):
        add(owner == index, category_id)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)), ids, segments


def _write_panoptic_split(root: Path, split: str, num_images: int, spec: SyntheticSpec) -> None:
    image_dir, png_dir = root / split, root / f"panoptic_{split}"
    image_dir.mkdir(parents=True)
    png_dir.mkdir(parents=True)
    images, annotations = [], []
    split_code = {"train": 0, "val": 1}[split]
    for index in range(num_images):
        rng = np.random.default_rng([spec.seed, split_code, index, 1])
        image, ids, segments = draw_panoptic_image(rng, spec.image_size, spec.shapes, spec.max_objects)
        image.save(image_dir / f"{index:06d}.jpg", quality=JPEG_QUALITY)
        rgb = np.stack([ids % 256, ids // 256 % 256, ids // 65536 % 256], axis=-1).astype(np.uint8)
        Image.fromarray(rgb).save(png_dir / f"{index:06d}.png")
        images.append({"id": index + 1, "file_name": f"{index:06d}.jpg", "width": spec.image_size,
                       "height": spec.image_size})
        annotations.append({"image_id": index + 1, "file_name": f"{index:06d}.png", "segments_info": segments})
    categories = ([{"id": i + 1, "name": name, "supercategory": "shape", "isthing": 1}
                   for i, name in enumerate(spec.shapes)]
                  + [{"id": len(spec.shapes) + 1 + i, "name": name, "supercategory": "band", "isthing": 0}
                     for i, name in enumerate(STUFF)])
    panoptic = {"info": {"description": f"detr_irpe synthetic panoptic shapes, {split} split",
                         "version": str(spec.version)},
                "licenses": [], "images": images, "annotations": annotations, "categories": categories}
    (root / "annotations").mkdir(exist_ok=True)
    (root / "annotations" / f"panoptic_{split}.json").write_text(json.dumps(panoptic))


# --- writing ---------------------------------------------------------------------------------

def _write_split(root: Path, split: str, num_images: int, spec: SyntheticSpec) -> None:
    image_dir = root / split
    image_dir.mkdir(parents=True)
    images, annotations = [], []
    split_code = {"train": 0, "val": 1}[split]
    for index in range(num_images):
        rng = np.random.default_rng([spec.seed, split_code, index])
        image, objects = draw_image(rng, spec.image_size, spec.shapes, spec.max_objects)
        file_name = f"{index:06d}.jpg"
        image.save(image_dir / file_name, quality=JPEG_QUALITY)
        images.append({"id": index + 1, "file_name": file_name, "width": spec.image_size, "height": spec.image_size})
        for obj in objects:
            annotations.append({"id": len(annotations) + 1, "image_id": index + 1, "iscrowd": 0, **obj})
    coco = {
        "info": {"description": f"detr_irpe synthetic shapes, {split} split",
                 "version": str(spec.version)},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(spec.shapes)],
    }
    (root / "annotations").mkdir(exist_ok=True)
    (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(coco))


def _manifest(spec: SyntheticSpec, complete: bool) -> str:
    fields = dataclasses.asdict(spec)
    if not spec.panoptic:
        del fields["panoptic"]  # the detection data's manifest as before the variant: cached copies stay valid
    return json.dumps({**fields, "shapes": list(spec.shapes), "complete": complete}, indent=2)


def _is_cached(root: Path, spec: SyntheticSpec, layout: SyntheticLayout) -> bool:
    try:
        manifest = json.loads((root / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    if manifest != json.loads(_manifest(spec, complete=True)):
        return False
    for split, count in (("train", spec.num_train), ("val", spec.num_val)):
        if not (root / getattr(layout, f"{split}_annotations")).is_file():
            return False
        folders = [getattr(layout, f"{split}_images")] + ([getattr(layout, f"{split}_panoptic_folder")]
                                                          if spec.panoptic else [])
        for folder in folders:
            if not (root / folder).is_dir() or sum(1 for _ in (root / folder).iterdir()) != count:
                return False
    return True


def ensure_synthetic_dataset(root: Union[str, Path], num_train: int = 2000, num_val: int = 200,
                             image_size: int = 128, seed: int = 0, *, max_objects: int = 6,
                             shapes: Sequence[str] = SHAPES, panoptic: bool = False) -> SyntheticLayout:
    """Generate the synthetic shapes dataset under ``root``, or reuse it if already there.

    ``panoptic``: the panoptic variant instead (:func:`draw_panoptic_image`: stuff bands and shapes
    as things, written as COCO panoptic json + PNGs: ``annotations/panoptic_{train,val}.json``,
    ``panoptic_{train,val}/*.png``); give it a root of its own.

    A copy is reused when its manifest records the same parameters; otherwise (different
    parameters, an interrupted run) its files are removed and regenerated. A ``root`` that
    holds other files but no manifest is refused rather than overwritten. Processes that call
    it at once on the same ``root`` (DDP ranks, two demos) take turns on a lock file beside it:
    one generates, the others then find the finished copy.
    """
    shapes = tuple(shapes)
    if not shapes or any(s not in SHAPES for s in shapes) or len(set(shapes)) != len(shapes):
        raise UsageError(f"shapes must be distinct names from {SHAPES}, got {shapes}")
    if num_train < 1 or num_val < 1:
        raise UsageError(f"num_train and num_val must be >= 1, got {num_train}, {num_val}")
    if image_size < 16:
        raise UsageError(f"image_size must be >= 16 pixels, got {image_size}")
    if max_objects < 1:
        raise UsageError(f"max_objects must be >= 1, got {max_objects}")
    spec = SyntheticSpec(num_train, num_val, image_size, seed, max_objects, shapes, panoptic=panoptic)
    root = Path(root)
    layout = SyntheticLayout(root=str(root), num_classes=len(shapes) + 1)
    if panoptic:
        layout = dataclasses.replace(layout, panoptic=True, num_classes=len(shapes) + len(STUFF) + 1,
                                     train_annotations="annotations/panoptic_train.json",
                                     val_annotations="annotations/panoptic_val.json")
    if _is_cached(root, spec, layout):
        return layout
    root.parent.mkdir(parents=True, exist_ok=True)
    with _locked(root.parent / f".{root.name}.lock"):
        if _is_cached(root, spec, layout):  # another process finished it while we waited
            return layout
        return _generate(root, spec, layout)


@contextlib.contextmanager
def _locked(path: Path):
    """An exclusive ``flock`` on ``path`` (held until the block ends; a no-op where fcntl is missing)."""
    try:
        import fcntl
    except ImportError:  # Windows
        yield
        return
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _generate(root: Path, spec: SyntheticSpec, layout: SyntheticLayout) -> SyntheticLayout:
    """Write the dataset of ``spec`` under ``root`` (called with the lock held)."""
    if root.exists() and any(root.iterdir()) and not (root / MANIFEST).is_file():
        raise DataRootInUseError(f"{root} already holds files that are not a synthetic dataset (no {MANIFEST}); "
                              f"choose an empty or new folder for the synthetic data.")
    root.mkdir(parents=True, exist_ok=True)
    (root / MANIFEST).write_text(_manifest(spec, complete=False))
    for name in ("train", "val"):
        shutil.rmtree(root / name, ignore_errors=True)
        shutil.rmtree(root / f"panoptic_{name}", ignore_errors=True)
        (root / "annotations" / f"instances_{name}.json").unlink(missing_ok=True)
        (root / "annotations" / f"panoptic_{name}.json").unlink(missing_ok=True)
    write = _write_panoptic_split if spec.panoptic else _write_split
    write(root, "train", spec.num_train, spec)
    write(root, "val", spec.num_val, spec)
    (root / MANIFEST).write_text(_manifest(spec, complete=True))  # last: marks the copy complete
    return dataclasses.replace(layout, generated=True)
