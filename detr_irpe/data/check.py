"""Check a COCO-format dataset without training: every problem, grouped, counted, with examples.

Used by ``tools/check_data.py`` and ``tools/train.py --check-data``. Checks the annotation json
(structure, ids, references, boxes, and with ``masks`` the segmentations: :mod:`.validate`) and
the image files: missing, not decodable (each one is fully decoded with PIL, so truncated files are found), of another
size than the json says, and with an EXIF orientation tag (every one listed: photo viewers
show it turned, the dataset reads it by :func:`~.images.dataset_orientation`). Errors are what
would stop (or silently spoil) training; warnings are what the loader tolerates.
"""
from __future__ import annotations

import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Dict, Iterable, List, Optional, Sequence, TextIO, Tuple, Union

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from .coco import SPLITS, read_json, resolve
from .errors import AnnotationError
from .images import TURNS, dataset_orientation, exif_orientation
from .panoptic import read_png_ids
from .validate import Report, validate_coco_dict, validate_panoptic_dict

if TYPE_CHECKING:
    from ..config import DataConfig

PathLike = Union[str, Path]
ImageProblem = Tuple[str, str]  # (finding code, example)


def check_image_file(path: Path, image_id: int, width=None, height=None, decode: bool = True) -> List[ImageProblem]:
    """The problems of one image file: missing, not decodable, not ``width`` x ``height`` (as the
    dataset loads it), or carrying an EXIF orientation tag (a warning). ``decode=False``: existence only."""
    if not path.is_file():
        return [("image_missing", f"{path} (image {image_id})")]
    if not decode:
        return []
    try:
        with Image.open(path) as im:
            im.load()  # decodes every byte: truncated files raise here
            stored, orientation = im.size, exif_orientation(im)
    except UnidentifiedImageError:
        return [("image_undecodable", f"{path} (image {image_id}): not an image format PIL knows")]
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        reason = str(e) if len(str(e)) <= 100 else str(e)[:97] + "..."
        return [("image_undecodable", f"{path} (image {image_id}): {reason}")]
    turned = dataset_orientation(orientation, stored, (width, height))
    problems = []
    if orientation != 1:
        boxes = ("the json gives the rotated size: loaded rotated, as viewers show it" if turned
                 else "boxes read on the stored pixels")
        turn = TURNS[orientation]
        problems.append(("exif_orientation", f"{path} (image {image_id}): viewers show it {turn}; {boxes}"))
    w, h = stored
    if (isinstance(width, (int, float)) and isinstance(height, (int, float)) and not turned
            and (w, h) != (width, height)):
        problems.append(("image_size_mismatch",
                         f"{path} (image {image_id}) is {w}x{h}, the json says {width}x{height}"))
    return problems


def check_panoptic_png(path: Path, image_id: int, segments: list, width=None, height=None,
                       decode: bool = True) -> List[ImageProblem]:
    """The problems of one COCO panoptic PNG: missing, not decodable, not ``width`` x ``height``,
    a listed segment (of ``segments``, the image's segments_info) absent from it, or pixels of an
    unlisted id (0, void, excepted). ``decode=False``: existence only."""
    if not path.is_file():
        return [("png_missing", f"{path} (image {image_id})")]
    if not decode:
        return []
    try:
        ids = read_png_ids(path)
    except (OSError, ValueError) as e:
        return [("png_undecodable", f"{path} (image {image_id}): {str(e)[:100]}")]
    problems = []
    if isinstance(width, int) and isinstance(height, int) and ids.shape != (height, width):
        problems.append(("png_size_mismatch", f"{path} (image {image_id}) is {ids.shape[1]}x{ids.shape[0]}, "
                                              f"the image {width}x{height}"))
    present = set(np.unique(ids).tolist())
    listed = {s["id"] for s in segments if isinstance(s, dict) and type(s.get("id")) is int}
    for segment_id in sorted(i for i in listed if i not in present):
        problems.append(("segment_absent", f"segment {segment_id} of image {image_id} is not in {path}"))
    unlisted = sorted(present - listed - {0})
    if unlisted:
        problems.append(("segment_unlisted", f"{path} (image {image_id}) has id(s) {unlisted[:5]}"))
    return problems


def check_dataset(annotation_file: PathLike, image_dir: Optional[PathLike], decode: bool = True,
                  workers: Optional[int] = None, progress: bool = False, max_examples: int = 5,
                  masks: bool = False, panoptic: Optional[PathLike] = None) -> Report:
    """Every problem of a COCO-format dataset (annotation json + image folder) in a :class:`Report`.

    ``image_dir=None`` checks the json alone; ``decode=False`` only checks that image files
    exist (fast); otherwise every image is decoded, on ``workers`` threads. ``masks``: check the
    segmentations too (instance segmentation, ``model.masks``). ``panoptic``: the json is COCO
    panoptic and this is its PNG folder; every PNG is checked (:func:`check_panoptic_png`).
    """
    annotation_file = Path(annotation_file)
    report = Report(str(annotation_file), max_examples=max_examples)
    if not annotation_file.is_file():
        report.add("structure").detail = f"annotation file not found: {annotation_file}"
        return report
    try:
        data = read_json(annotation_file)
    except AnnotationError as e:
        report.add("structure").detail = str(e)
        return report
    if panoptic is not None:
        report = validate_panoptic_dict(data, str(annotation_file), max_examples=max_examples)
        if report.structure_ok:
            _check_pngs(data, Path(panoptic), decode, workers, report)
    else:
        report = validate_coco_dict(data, str(annotation_file), max_examples=max_examples, masks=masks)
    if not report.structure_ok or image_dir is None:
        return report
    report.image_dir = str(image_dir)
    image_dir = Path(image_dir)
    if not image_dir.is_dir():
        report.add("image_folder").detail = (f"image folder not found: {image_dir}, so no image file was checked. "
                                             f"Point data.*_images (or --images) at the folder holding the images.")
        return report
    entries = [img for img in data["images"] if isinstance(img, dict) and type(img.get("id")) is int
               and isinstance(img.get("file_name"), str) and img["file_name"].strip()]

    def check(img: dict) -> List[ImageProblem]:
        return check_image_file(image_dir / img["file_name"], img["id"], img.get("width"), img.get("height"), decode)

    workers = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:  # PIL releases the GIL while decoding
        results = pool.map(check, entries, chunksize=16)
        for problems in tqdm(results, total=len(entries), desc=f"images of {annotation_file.name}",
                             disable=not progress, leave=False, file=sys.stderr):
            for code, example in problems:
                report.add(code, example)
    report.image_files_checked = len(entries)
    report.images_decoded = decode
    return report


def _check_pngs(data: dict, png_dir: Path, decode: bool, workers: Optional[int], report: Report) -> None:
    """The PNG of every well-formed panoptic annotation of ``data``, into ``report``."""
    if not png_dir.is_dir():
        report.add("png_folder").detail = (f"panoptic PNG folder not found: {png_dir}, so no PNG was checked. "
                                           f"Point data.*_panoptic_folder (or --panoptic) at it.")
        return
    sizes = {img["id"]: (img.get("width"), img.get("height")) for img in data["images"]
             if isinstance(img, dict) and type(img.get("id")) is int}
    entries = [a for a in data["annotations"] if isinstance(a, dict) and type(a.get("image_id")) is int
               and isinstance(a.get("file_name"), str) and type(a.get("segments_info")) is list]

    def check(ann: dict) -> List[ImageProblem]:
        width, height = sizes.get(ann["image_id"], (None, None))
        return check_panoptic_png(png_dir / ann["file_name"], ann["image_id"], ann["segments_info"], width, height,
                                  decode)

    with ThreadPoolExecutor(max_workers=workers or min(8, os.cpu_count() or 1)) as pool:
        for problems in pool.map(check, entries, chunksize=16):
            for code, example in problems:
                report.add(code, example)


def check_config_splits(cfg: "DataConfig", splits: Iterable[str] = SPLITS, **kwargs) -> Dict[str, Report]:
    """:func:`check_dataset` on each of ``splits`` as ``cfg`` (``data.*`` keys) describes them."""
    reports = {}
    for split in splits:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        panoptic = (resolve(cfg.root, getattr(cfg, f"{split}_panoptic_folder"))
                    if cfg.dataset == "coco_panoptic" else None)
        reports[split] = check_dataset(resolve(cfg.root, getattr(cfg, f"{split}_annotations")),
                                       resolve(cfg.root, getattr(cfg, f"{split}_images")), panoptic=panoptic,
                                       **kwargs)
    return reports


def _items(findings) -> str:
    kinds, items = len(findings), sum(f.count for f in findings)
    return f"{kinds} kind{'s' * (kinds != 1)} ({items} item{'s' * (items != 1)})"


def format_report(report: Report, name: str = "", max_examples: int = 3) -> str:
    """The findings of one dataset, errors first, one block per kind."""
    lines = [f"== {name + ': ' if name else ''}{report.source}"
             + (f" (images in {report.image_dir})" if report.image_dir else "")]
    if report.structure_ok:
        files = "; image files not checked (no image folder given)"
        if report.image_files_checked:
            how = "each decoded fully" if report.images_decoded else "not decoded: --no-images"
            files = f"; {report.image_files_checked} image files checked ({how})"
        lines.append(f"   {report.num_images} images, {report.num_annotations} annotations, "
                     f"{report.num_categories} categories{files}")
    for label, findings in (("ERROR  ", report.errors), ("WARNING", report.warnings)):
        for finding in findings:
            lines.append(f"   {label} {finding.describe(max_examples)}")
    if report.ok and not report.warnings:
        lines.append("   no problems found")
    return "\n".join(lines)


def summary_line(reports: Dict[str, Report], strict: bool = False) -> str:
    errors = [f for r in reports.values() for f in r.errors]
    warnings = [f for r in reports.values() for f in r.warnings]
    names = ", ".join(reports)
    failed = bool(errors) or (strict and bool(warnings))
    text = f"check_data {'FAILED' if failed else 'OK'} ({names}): "
    text += f"{_items(errors)} of errors" if errors else "no errors"
    text += f", {_items(warnings)} of warnings (tolerated: handled during loading)" if warnings else ", no warnings"
    if strict and warnings and not errors:
        text += "; --strict counts warnings as problems"
    return text


def report_and_exit_code(reports: Dict[str, Report], strict: bool = False, max_examples: int = 3,
                         out: Optional[TextIO] = None) -> int:
    """Print every report and a summary line; 0 if there are no errors (nor warnings with ``strict``), else 1."""
    out = out or sys.stdout
    for name, report in reports.items():
        print(format_report(report, name, max_examples), file=out)
    print(summary_line(reports, strict), file=out, flush=True)
    failed = any(not r.ok for r in reports.values()) or (strict and any(r.warnings for r in reports.values()))
    return 1 if failed else 0


def check_config_data(cfg: "DataConfig", splits: Sequence[str] = SPLITS, decode: bool = True,
                      strict: bool = False, progress: bool = True, out: Optional[TextIO] = None,
                      masks: bool = False) -> int:
    """Check the config's splits, print the reports; the exit code (for ``tools/train.py --check-data``;
    ``masks``: the segmentations too, for ``model.masks``)."""
    reports = check_config_splits(cfg, splits, decode=decode, progress=progress, masks=masks)
    return report_and_exit_code(reports, strict=strict, out=out)
