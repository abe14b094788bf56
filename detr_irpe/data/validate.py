"""Validation of a COCO detection dict: every problem, counted, with examples and what to do.

:func:`validate_coco_dict` never raises: it returns a :class:`Report` of findings. ``error``
findings make the file unusable (training would crash or train / evaluate on garbage, possibly
hours later) and :func:`check_coco_dict` raises them all at dataset construction.
``warning`` findings are tolerated: the loader handles them as DETR does (boxes of zero or
negative size, or outside the image, are dropped; boxes across the border are clipped).
``tools/check_data.py`` prints both.

One pass in plain Python over the annotations plus numpy on the boxes: about a second for the
860k annotations of COCO train2017.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

ERROR, WARNING = "error", "warning"
REQUIRED_KEYS = ("images", "annotations", "categories")
INT64_MAX = 2**63 - 1
BORDER_TOLERANCE = 1.0  # px a box may extend past the border before it is reported (COCO rounding)
_NUMBER_TYPES = frozenset((int, float))

COCO_HINT = ("A COCO detection file is a JSON object with 'images', 'annotations' and 'categories' lists "
             "(like annotations/instances_val2017.json); see datasets/README.md.")

# code -> (severity, noun, what, what to do). The message reads "<count> <noun>(s) <what>: <examples>. <fix>"
KINDS: Dict[str, Tuple[str, str, str, str]] = {
    "structure": (ERROR, "", "", ""),
    "no_images": (ERROR, "", "the file lists no images: the dataset is empty",
                  "Add entries to 'images' or point the config at another annotation file."),
    "category_entry": (ERROR, "category entry", "without an integer 'id' >= 0",
                       "Give every category an integer id (labels are category ids)."),
    "no_categories": (WARNING, "", "'categories' is empty",
                      "Tolerated without annotations; set model.num_classes, since it cannot be read from the file."),
    "category_duplicate": (ERROR, "category id", "listed more than once in 'categories'",
                           "Keep one entry per category id."),
    "image_entry": (ERROR, "image entry", "that is not a JSON object", "Remove or fix these entries."),
    "image_id": (ERROR, "image", "without a valid 'id' (an integer)", "Give every image a unique integer id."),
    "image_duplicate": (ERROR, "image id", "used by more than one entry of 'images'",
                        "Give every image a unique id (annotations refer to images by id)."),
    "image_file_name": (ERROR, "image", "without a valid 'file_name' (a non-empty string)",
                        "Set 'file_name' to the image's path relative to the image folder."),
    "image_size": (ERROR, "image", "whose 'width' / 'height' are not positive integers",
                   "Fix the sizes (they must match the image files) or remove the keys."),
    "image_size_missing": (WARNING, "image", "without 'width' / 'height'",
                           "Tolerated: sizes are read from the files, but boxes cannot be checked against "
                           "the image border here."),
    "image_file_duplicate": (WARNING, "image file", "listed under more than one image id",
                             "Usually a conversion mistake: each file should be one image entry."),
    "annotation_entry": (ERROR, "annotation entry", "that is not a JSON object", "Remove or fix these entries."),
    "annotation_id": (ERROR, "annotation", "without a valid 'id' (an integer >= 1)",
                      "Number annotations from 1: pycocotools' COCOeval cannot match a ground-truth "
                      "annotation whose id is 0, so it would silently lower the AP."),
    "annotation_duplicate": (ERROR, "annotation id", "used by more than one annotation",
                             "Give every annotation a unique id (COCOeval looks annotations up by id)."),
    "annotation_keys": (ERROR, "annotation", "missing 'image_id', 'category_id' or 'bbox'",
                        "Every annotation needs all three."),
    "unknown_image": (ERROR, "annotation", "whose image_id is not in 'images'",
                      "Add the image entry or drop the annotation."),
    "unknown_category": (ERROR, "annotation", "whose category_id is not in 'categories'", ""),
    "bbox_malformed": (ERROR, "annotation", "whose 'bbox' is not a list of 4 numbers",
                       "A COCO bbox is [x, y, width, height] in pixels; fix or remove these annotations."),
    "bbox_nonfinite": (ERROR, "annotation", "with NaN or infinite bbox values",
                       "Fix or remove these annotations (they would make the loss NaN)."),
    "area": (ERROR, "annotation", "whose 'area' is not a finite number >= 0",
             "Fix the area (the box area width * height will do) or remove the key."),
    "iscrowd": (ERROR, "annotation", "whose 'iscrowd' is not 0 or 1", "Set iscrowd to 0 (or 1 for crowd regions)."),
    "no_annotations": (WARNING, "", "the file has no annotations at all",
                       "Tolerated, but a model trained on it learns only 'no object'."),
    "bbox_negative": (WARNING, "annotation", "with a negative box width or height (dropped during loading)",
                      "COCO boxes are [x, y, width, height]: a file with [x1, y1, x2, y2] boxes needs converting."),
    "bbox_empty": (WARNING, "annotation", "with zero box width or height (dropped during loading)", ""),
    # instance segmentation (checked only for model.masks: nothing else reads the segmentations)
    "segmentation_missing": (ERROR, "annotation", "without a 'segmentation' (instance masks need one)",
                             "Add its polygons or RLE, or remove the annotation, or train without model.masks."),
    "segmentation_malformed": (ERROR, "annotation",
                               "whose 'segmentation' is neither polygons nor RLE of its image",
                               "COCO's format: a list of polygons [[x1, y1, x2, y2, ...], ...], each at least "
                               "3 points (6 numbers), or RLE {'counts': ..., 'size': [height, width]} of the "
                               "image's size (and polygons need the image's width / height in 'images'). "
                               "Fix or remove these annotations."),
    "bbox_outside": (WARNING, "annotation", "whose box lies entirely outside its image (dropped during loading)",
                     "Check the boxes and the images' width / height."),
    # image files (tools/check_data.py; the dataset meets these only when it loads the image)
    "image_folder": (ERROR, "", "", ""),
    "image_missing": (ERROR, "image file", "missing",
                      "Check that the image folder is the right one (data.*_images), or remove these images "
                      "from the json."),
    "image_undecodable": (ERROR, "image file", "that cannot be decoded (corrupt, truncated or not an image)",
                          "Replace the files or remove these images from the json."),
    "image_size_mismatch": (ERROR, "image file", "whose size differs from the json's width / height",
                            "Fix the json (the boxes were drawn on an image of some size) or the files."),
    "exif_orientation": (WARNING, "image file", "with an EXIF orientation tag (photo viewers turn the picture; "
                         "the dataset reads the stored pixels unless the json gives the rotated size)",
                         "If the boxes were drawn on the image as viewers show it, re-save it upright without "
                         "the tag (PIL.ImageOps.exif_transpose) and give the json its upright size; if they were "
                         "drawn on the stored pixels (COCO's convention), nothing to do."),
    # COCO panoptic (data.dataset=coco_panoptic): panoptic_*.json and its PNG folder
    "panoptic_entry": (ERROR, "panoptic annotation", "without an integer 'image_id', a 'file_name' (its PNG) and "
                       "a 'segments_info' list", "Every entry of 'annotations' describes one image's PNG."),
    "panoptic_duplicate": (ERROR, "image", "with more than one panoptic annotation",
                           "Keep one entry of 'annotations' per image."),
    "panoptic_missing": (WARNING, "image", "without a panoptic annotation (left out of the dataset)", ""),
    "category_isthing": (ERROR, "category", "without an 'isthing' of 0 or 1",
                         "Panoptic categories are things (1) or stuff (0): post-processing and PQ need the flag."),
    "segment_entry": (ERROR, "segment", "without an integer 'id' >= 1 (0 is void) and a 'category_id'",
                      "Every entry of segments_info needs the id its pixels have in the PNG "
                      "(R + 256 G + 256^2 B) and its category."),
    "segment_duplicate": (ERROR, "segment id", "listed more than once in one image's segments_info",
                          "Give each segment of an image its own id."),
    "png_folder": (ERROR, "", "", ""),
    "png_missing": (ERROR, "panoptic PNG", "missing",
                    "Check that data.*_panoptic_folder (or --panoptic) is the PNG folder of this json."),
    "png_undecodable": (ERROR, "panoptic PNG", "that cannot be decoded", "Replace the files."),
    "png_size_mismatch": (ERROR, "panoptic PNG", "whose size differs from its image's width / height",
                          "The PNG must have the image's size; fix the json or the files."),
    "segment_absent": (ERROR, "segment", "listed in segments_info but absent from its PNG",
                       "Remove the segment from segments_info, or fix the PNG (its colour gives the id)."),
    "segment_unlisted": (ERROR, "panoptic PNG", "with pixels of a segment id that segments_info does not list",
                         "List the segment in segments_info, or paint its pixels 0 (void)."),
    "bbox_clipped": (WARNING, "annotation",
                     f"whose box extends more than {BORDER_TOLERANCE:g} px past the image border "
                     f"(clipped during loading)", ""),
}

# kinds whose every example is kept and shown, one per line: each names a file the user must decide about
LIST_ALL = frozenset({"exif_orientation"})


def _plural(noun: str, count: int) -> str:
    if count == 1:
        return noun
    return noun[:-1] + "ies" if noun.endswith("y") and not noun.endswith("ey") else noun + "s"


def short(value: Any, limit: int = 60) -> str:
    """``repr`` of ``value`` cut to ``limit`` characters (values in messages come from user files)."""
    try:
        text = repr(value)
    except (ValueError, RecursionError):  # e.g. an integer with more than 4300 digits
        text = f"<{type(value).__name__} too large to show>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass
class Finding:
    """One kind of problem, how often it occurs and the first few occurrences."""

    code: str
    count: int = 0
    examples: List[str] = field(default_factory=list)
    detail: str = ""  # replaces the standard text (structure errors) or completes the fix (categories)
    max_examples: int = 5

    @property
    def severity(self) -> str:
        return KINDS[self.code][0]

    @property
    def lists_all(self) -> bool:
        """Every example is kept and shown (kinds of :data:`LIST_ALL`), not the first ``max_examples``."""
        return self.code in LIST_ALL

    def add(self, example: Optional[str] = None) -> None:
        self.count += 1
        if example is not None and (self.lists_all or len(self.examples) < self.max_examples):
            self.examples.append(example)

    def describe(self, max_examples: int = 3) -> str:
        """E.g. ``3 annotations with NaN or infinite bbox values: annotation 12 (image 4) has bbox [nan, ...]; ...``;
        kinds that list all their examples show each on its own line."""
        _, noun, what, fix = KINDS[self.code]
        if self.code in ("structure", "image_folder", "png_folder"):
            return self.detail
        head = f"{self.count} {_plural(noun, self.count)} {what}" if noun else what
        fix = " ".join(s for s in (self.detail, fix) if s)
        if self.lists_all and self.examples:
            return head + ":\n" + "".join(f"      - {e}\n" for e in self.examples) + f"      {fix}"
        shown = self.examples[:max_examples]
        if shown:
            more = self.count - len(shown)
            head += ": " + "; ".join(shown) + (f"; and {more} more" if more > 0 else "")
        return f"{head}. {fix}" if fix else head + "."


@dataclass
class Report:
    """Findings of one annotation file (and, from :mod:`.check`, of its image files)."""

    source: str
    findings: Dict[str, Finding] = field(default_factory=dict)
    num_images: int = 0
    num_annotations: int = 0
    num_categories: int = 0
    image_dir: str = ""  # set by tools/check_data.py
    image_files_checked: int = 0
    images_decoded: bool = False
    max_examples: int = 5

    def finding(self, code: str) -> Finding:
        """The finding of kind ``code``, created (with count 0) if new."""
        if code not in KINDS:
            raise KeyError(f"unknown finding code {code!r}")
        if code not in self.findings:
            self.findings[code] = Finding(code, max_examples=self.max_examples)
        return self.findings[code]

    def add(self, code: str, example: Optional[str] = None) -> Finding:
        finding = self.finding(code)
        finding.add(example)
        return finding

    def add_many(self, code: str, count: int, examples: List[str]) -> None:
        finding = self.finding(code)
        finding.count += count
        room = len(examples) if finding.lists_all else max(self.max_examples - len(finding.examples), 0)
        finding.examples.extend(examples[:room])

    def of(self, severity: str) -> List[Finding]:
        """Findings of ``severity``, in the order of :data:`KINDS`."""
        order = list(KINDS)
        return sorted((f for f in self.findings.values() if f.severity == severity), key=lambda f: order.index(f.code))

    @property
    def errors(self) -> List[Finding]:
        return self.of(ERROR)

    @property
    def warnings(self) -> List[Finding]:
        return self.of(WARNING)

    @property
    def ok(self) -> bool:
        return not self.errors

    @property
    def structure_ok(self) -> bool:
        """False when the file is not a COCO detection dict at all (nothing else was checked)."""
        return "structure" not in self.findings


def validate_coco_dict(data: Any, source: str = "annotation file", max_examples: int = 5,
                       masks: bool = False) -> Report:
    """Every problem of the COCO detection dict ``data``; with ``masks`` (instance segmentation) of
    its segmentations too. Never raises on any JSON value."""
    report = Report(str(source), max_examples=max_examples)
    if not _check_structure(data, report):
        return report
    if data["annotations"] and all(isinstance(a, dict) and "segments_info" in a for a in data["annotations"]):
        report.add("structure").detail = (
            f"{source} is a COCO panoptic file (its annotations hold 'segments_info'), not a detection one: "
            f"set data.dataset=coco_panoptic and data.*_panoptic_folder (check-data: --panoptic PNG_FOLDER)")
        return report
    report.num_images, report.num_annotations = len(data["images"]), len(data["annotations"])
    report.num_categories = len(data["categories"])
    cat_ids = _check_categories(data["categories"], report)
    sizes = _check_images(data["images"], report)
    _check_annotations(data["annotations"], cat_ids, sizes, report)
    if masks:
        _check_segmentations(data["annotations"], sizes, report)
    return report


def _check_structure(data: Any, report: Report) -> bool:
    def fail(text: str) -> bool:
        report.add("structure").detail = text
        return False

    source = report.source
    if isinstance(data, list):
        return fail(f"{source} holds a JSON list, which looks like a detection results file, "
                    f"not ground truth. {COCO_HINT}")
    if not isinstance(data, dict):
        return fail(f"{source} holds a JSON {type(data).__name__}, not a COCO annotation file. {COCO_HINT}")
    missing = [k for k in REQUIRED_KEYS if k not in data]
    if missing:
        return fail(f"{source} is not a COCO detection file: missing key(s) "
                    f"{', '.join(repr(k) for k in missing)}. {COCO_HINT}")
    for key in REQUIRED_KEYS:
        if not isinstance(data[key], list):
            return fail(f"{source}: '{key}' must be a list, got {type(data[key]).__name__}. {COCO_HINT}")
    return True


def _is_int(value: Any, low: int = -INT64_MAX - 1) -> bool:
    return type(value) is int and low <= value <= INT64_MAX


def _check_categories(categories: list, report: Report) -> set:
    ids: set = set()
    for pos, cat in enumerate(categories):
        cid = cat.get("id") if isinstance(cat, dict) else None
        if not _is_int(cid, 0):
            report.add("category_entry", f"entry #{pos} {short(cat)}")
        elif cid in ids:
            report.add("category_duplicate", f"id {cid}")
        else:
            ids.add(cid)
    if not categories:
        report.add("no_categories")
    return ids


def _positive_int(value: Any) -> bool:
    """A positive integer, also written as a float like 640.0 (some converters do)."""
    if type(value) is int:
        return 0 < value <= INT64_MAX
    return type(value) is float and math.isfinite(value) and value > 0 and value.is_integer()


def _check_images(images: list, report: Report) -> Dict[int, Tuple[float, float]]:
    """Image id -> (width, height), NaN where unknown; only images with a valid id."""
    sizes: Dict[int, Tuple[float, float]] = {}
    positions: Dict[int, int] = {}
    files: Dict[str, int] = {}
    if not images:
        report.add("no_images")
    for pos, img in enumerate(images):
        if not isinstance(img, dict):
            report.add("image_entry", f"entry #{pos} {short(img)}")
            continue
        iid = img.get("id")
        if not _is_int(iid):
            report.add("image_id", f"entry #{pos} has id {short(iid)}" if "id" in img else f"entry #{pos} has no id")
            continue
        if iid in sizes:
            report.add("image_duplicate", f"id {iid} (entries #{positions[iid]} and #{pos})")
            continue
        positions[iid] = pos
        name = img.get("file_name")
        if not isinstance(name, str) or not name.strip():
            report.add("image_file_name", f"image {iid} has file_name {short(name)}")
        elif name in files:
            report.add("image_file_duplicate", f"{name!r} (images {files[name]} and {iid})")
        else:
            files[name] = iid
        w, h = img.get("width"), img.get("height")
        if w is None and h is None and "width" not in img and "height" not in img:
            report.add("image_size_missing", f"image {iid}")
            sizes[iid] = (math.nan, math.nan)
        elif not (_positive_int(w) and _positive_int(h)):
            report.add("image_size", f"image {iid} has width {short(w)}, height {short(h)}")
            sizes[iid] = (math.nan, math.nan)
        else:
            sizes[iid] = (float(w), float(h))
    return sizes


def _finite_number(value: Any, low: float = -math.inf) -> bool:
    if type(value) is float:
        return math.isfinite(value) and value >= low
    return type(value) is int and low <= value < 1e308  # larger integers overflow a float


def _annotation_label(pos: int, ann: dict) -> str:
    """``annotation 12 (image 4)``, or by list position where the id is unusable."""
    aid, iid = ann.get("id"), ann.get("image_id")
    label = f"annotation {aid}" if _is_int(aid) else f"annotation #{pos}"
    return label + (f" (image {iid})" if _is_int(iid) else "")


def _check_annotations(annotations: list, cat_ids: set, sizes: Dict[int, Tuple[float, float]],
                       report: Report) -> None:
    if not annotations:
        report.add("no_annotations")
    seen: Dict[int, int] = {}  # annotation id -> position
    boxes: List[list] = []  # the bboxes that are 4 numbers, with their position, image size and crowd flag
    positions: List[int] = []
    image_size: List[Tuple[float, float]] = []
    crowd: List[bool] = []
    unknown = (math.nan, math.nan)

    def note(code: str, pos: int, ann: dict, text: str) -> None:
        finding = report.finding(code)
        finding.add(f"{_annotation_label(pos, ann)} {text}" if len(finding.examples) < report.max_examples else None)

    for pos, ann in enumerate(annotations):  # plain Python on purpose: 860k annotations in about a second
        if type(ann) is not dict:
            report.add("annotation_entry", f"entry #{pos} {short(ann)}")
            continue
        aid = ann.get("id")
        if type(aid) is not int or not 1 <= aid <= INT64_MAX:
            report.add("annotation_id", f"entry #{pos} has " + (f"id {short(aid)}" if "id" in ann else "no id"))
        elif aid in seen:
            report.add("annotation_duplicate", f"id {aid} (entries #{seen[aid]} and #{pos})")
        else:
            seen[aid] = pos
        if "image_id" not in ann or "category_id" not in ann or "bbox" not in ann:
            missing = [k for k in ("image_id", "category_id", "bbox") if k not in ann]
            note("annotation_keys", pos, ann, f"has no {', '.join(missing)}")
            continue
        iid = ann["image_id"]
        size = sizes.get(iid) if type(iid) is int else None
        if size is None:
            note("unknown_image", pos, ann, f"refers to image_id {short(iid)}")
            size = unknown
        cid = ann["category_id"]
        if type(cid) is not int or cid not in cat_ids:
            note("unknown_category", pos, ann, f"has category_id {short(cid)}")
        if "area" in ann and not _finite_number(ann["area"], low=0):
            note("area", pos, ann, f"has area {short(ann['area'])}")
        is_crowd = ann.get("iscrowd", 0)
        if type(is_crowd) not in (int, bool) or is_crowd not in (0, 1):
            note("iscrowd", pos, ann, f"has iscrowd {short(is_crowd)}")
        bbox = ann["bbox"]
        if type(bbox) is not list or len(bbox) != 4 or not _NUMBER_TYPES.issuperset(map(type, bbox)):
            note("bbox_malformed", pos, ann, f"has bbox {short(bbox)}")
            continue
        boxes.append(bbox)
        positions.append(pos)
        image_size.append(size)
        crowd.append(is_crowd is True or is_crowd == 1)
    if "unknown_category" in report.findings:
        shown = sorted(cat_ids)
        shown = f"{shown[:20]} ..." if len(shown) > 20 else str(shown)
        report.findings["unknown_category"].detail = (f"'categories' has ids {shown}: add the category there "
                                                      f"or fix the annotations.")
    def label(i: int) -> str:
        return _annotation_label(positions[i], annotations[positions[i]])

    _check_boxes(boxes, label, image_size, crowd, report)


def _as_float_array(boxes: List[list]) -> np.ndarray:
    try:
        return np.array(boxes, dtype=np.float64).reshape(-1, 4)
    except OverflowError:  # an integer beyond the float range: that value is infinite for us
        def num(v):
            try:
                return float(v)
            except OverflowError:
                return math.inf if v > 0 else -math.inf
        return np.array([[num(v) for v in box] for box in boxes], dtype=np.float64).reshape(-1, 4)


def _check_boxes(boxes: List[list], labels: Callable[[int], str], image_size: List[Tuple[float, float]],
                 crowd: List[bool], report: Report) -> None:
    """Numeric box checks, vectorised (COCO train2017 has 860k boxes)."""
    if not boxes:
        return
    xywh = _as_float_array(boxes)
    size = np.array(image_size, dtype=np.float64).reshape(-1, 2)
    x, y, w, h = xywh.T
    with np.errstate(invalid="ignore", over="ignore"):
        finite = np.isfinite(xywh).all(axis=1)
        x1, y1 = x + w, y + h  # inf on overflow, never NaN for finite boxes
        negative = finite & ((w < 0) | (h < 0))
        empty = finite & ~negative & ((w == 0) | (h == 0))
        sized = finite & ~negative & ~empty & ~np.asarray(crowd, dtype=bool)
        W, H = size[:, 0], size[:, 1]  # NaN (unknown) compares False: nothing reported
        outside = sized & ((x >= W) | (y >= H) | (x1 <= 0) | (y1 <= 0))
        tol = BORDER_TOLERANCE
        clipped = sized & ~outside & ((x < -tol) | (y < -tol) | (x1 > W + tol) | (y1 > H + tol))

    def report_mask(code: str, mask: np.ndarray, with_size: bool = False) -> None:
        positions = np.flatnonzero(mask)
        if not len(positions):
            return
        examples = []
        for p in positions[: report.max_examples]:
            text = f"{labels(p)} has bbox [{', '.join(f'{v:.6g}' for v in xywh[p])}]"
            if with_size:
                text += f" in a {W[p]:g}x{H[p]:g} image"
            examples.append(text)
        report.add_many(code, len(positions), examples)

    report_mask("bbox_nonfinite", ~finite)
    report_mask("bbox_negative", negative)
    report_mask("bbox_empty", empty)
    report_mask("bbox_outside", outside, with_size=True)
    report_mask("bbox_clipped", clipped, with_size=True)



def _finite_sum(values: list) -> bool:
    """Whether the numbers ``values`` sum to a finite float (no NaN, no infinity, no overflow)."""
    try:
        return math.isfinite(sum(values))
    except (OverflowError, TypeError):
        return False


def segmentation_problem(segmentation: Any, size: Optional[Tuple[float, float]]) -> Optional[str]:
    """What makes ``segmentation`` unreadable as the mask of an image of ``size = (width, height)``
    (NaN where the image gives none; None: no such image, reported elsewhere), or None.

    Polygons: a non-empty list of lists of numbers, each an even count of at least 6 (pycocotools
    reads 4 as a box); RLE: ``counts`` (a string, or run lengths summing to height x width) and
    ``size`` ``[height, width]`` of the image."""
    width, height = size if size is not None else (0.0, 0.0)
    known = size is not None and not (math.isnan(width) or math.isnan(height))
    if type(segmentation) is list:
        if not segmentation:
            return "an empty list of polygons"
        for polygon in segmentation:
            if type(polygon) is not list or not _NUMBER_TYPES.issuperset(map(type, polygon)):
                return f"a polygon that is not a list of numbers: {short(polygon, 40)}"
            if len(polygon) < 6 or len(polygon) % 2:
                return f"a polygon of {len(polygon)} coordinates (x, y pairs, at least 3 points)"
            if not _finite_sum(polygon):
                return "a polygon with a NaN or infinite coordinate"
        if size is not None and not known:
            return "polygons, but its image has no valid width / height to draw them in"
        return None
    if type(segmentation) is not dict or "counts" not in segmentation or "size" not in segmentation:
        return f"segmentation {short(segmentation, 40)}"
    rle_size, counts = segmentation["size"], segmentation["counts"]
    if (type(rle_size) is not list or len(rle_size) != 2 or not all(_is_int(v, 1) for v in rle_size)):
        return f"RLE of size {short(rle_size, 30)} (expected [height, width])"
    if known and rle_size != [height, width]:
        return f"RLE of size {rle_size}, but its image is {width:g}x{height:g} (size is [height, width])"
    if type(counts) is list:
        if not all(_is_int(v, 0) for v in counts) or sum(counts) != rle_size[0] * rle_size[1]:
            return "RLE whose run lengths do not add up to height x width"
    elif type(counts) is not str or not counts:
        return f"RLE with counts {short(counts, 30)} (expected a string or a list of run lengths)"
    return None


def _check_segmentations(annotations: list, sizes: Dict[int, Tuple[float, float]], report: Report) -> None:
    for pos, ann in enumerate(annotations):
        if type(ann) is not dict:
            continue
        if "segmentation" not in ann:
            finding = report.finding("segmentation_missing")
            finding.add(_annotation_label(pos, ann) if len(finding.examples) < report.max_examples else None)
            continue
        iid = ann.get("image_id")
        problem = segmentation_problem(ann["segmentation"], sizes.get(iid) if type(iid) is int else None)
        if problem is not None:
            finding = report.finding("segmentation_malformed")
            finding.add(f"{_annotation_label(pos, ann)} has {problem}"
                        if len(finding.examples) < report.max_examples else None)


PANOPTIC_HINT = ("A COCO panoptic file is a JSON object with 'images', 'annotations' (one per image: 'image_id', "
                 "'file_name' of its PNG, 'segments_info') and 'categories' (with 'isthing') lists, like "
                 "annotations/panoptic_val2017.json; see datasets/README.md.")


def validate_panoptic_dict(data: Any, source: str = "annotation file", max_examples: int = 5) -> Report:
    """Every problem of the COCO panoptic dict ``data`` (its PNGs are :mod:`.check`'s); never raises.
    ``num_annotations`` counts segments."""
    report = Report(str(source), max_examples=max_examples)
    if not _check_structure(data, report):
        report.findings["structure"].detail = report.findings["structure"].detail.replace(COCO_HINT, PANOPTIC_HINT)
        return report
    report.num_images, report.num_categories = len(data["images"]), len(data["categories"])
    cat_ids = _check_categories(data["categories"], report)
    for cat in data["categories"]:
        if isinstance(cat, dict) and _is_int(cat.get("id")) and cat["id"] in cat_ids and cat.get("isthing") not in (0, 1):
            report.add("category_isthing", f"category {cat['id']} has isthing {short(cat.get('isthing'))}")
    sizes = _check_images(data["images"], report)
    annotated: Dict[int, int] = {}
    for pos, ann in enumerate(data["annotations"]):
        iid = ann.get("image_id") if isinstance(ann, dict) else None
        if (not _is_int(iid) or not isinstance(ann.get("file_name"), str) or not ann["file_name"].strip()
                or type(ann.get("segments_info")) is not list):
            report.add("panoptic_entry", f"entry #{pos} {short(ann)}")
            continue
        if iid not in sizes:
            report.add("unknown_image", f"panoptic annotation #{pos} refers to image_id {iid}")
        if iid in annotated:
            report.add("panoptic_duplicate", f"image {iid} (entries #{annotated[iid]} and #{pos})")
            continue
        annotated[iid] = pos
        _check_segments(ann["segments_info"], iid, cat_ids, report)
    missing = [iid for iid in sizes if iid not in annotated]
    if missing:
        report.add_many("panoptic_missing", len(missing), [f"image {iid}" for iid in missing[:max_examples]])
    if "unknown_category" in report.findings:
        report.findings["unknown_category"].detail = f"'categories' has ids {sorted(cat_ids)[:20]}: add it there."
    return report


def _check_segments(segments: list, image_id: int, cat_ids: set, report: Report) -> None:
    seen: set = set()
    for pos, segment in enumerate(segments):
        sid = segment.get("id") if isinstance(segment, dict) else None
        if not _is_int(sid, 1) or "category_id" not in segment:
            report.add("segment_entry", f"image {image_id}, segment #{pos} {short(segment)}")
            continue
        report.num_annotations += 1
        label = f"segment {sid} (image {image_id})"
        if sid in seen:
            report.add("segment_duplicate", label)
        seen.add(sid)
        if type(segment["category_id"]) is not int or segment["category_id"] not in cat_ids:
            report.add("unknown_category", f"{label} has category_id {short(segment['category_id'])}")
        if segment.get("iscrowd", 0) not in (0, 1) or type(segment.get("iscrowd", 0)) not in (int, bool):
            report.add("iscrowd", f"{label} has iscrowd {short(segment.get('iscrowd'))}")
        if "area" in segment and not _finite_number(segment["area"], low=0):
            report.add("area", f"{label} has area {short(segment['area'])}")
        bbox = segment.get("bbox", [0, 0, 0, 0])  # box AP of a panoptic detector reads it
        if type(bbox) is not list or len(bbox) != 4 or not all(_finite_number(v) for v in bbox):
            report.add("bbox_malformed", f"{label} has bbox {short(bbox)}")
