"""The libraries that can compute COCO AP, one small adapter each, behind one ``run_cocoeval``.

pycocotools is the reference (official DETR's evaluation) and the fallback. The others are an
optional extra (``pip install "detr_irpe[fast-eval]"``) and share its API (``COCO``, ``loadRes``,
``COCOeval``), so an adapter only says how to import the library and build its objects.

A backend is used only where it gives the same bits as pycocotools: ``auto`` takes the fastest
installed one of those, and a library that is known to differ is refused with the reason (see
:data:`NOT_EXACT`). ``tests/test_eval_backends.py`` holds every backend to that on a deliberately
nasty set, bbox and segm.
"""
from __future__ import annotations

import contextlib
import copy
import importlib
import importlib.metadata
import importlib.util
import io
from dataclasses import dataclass
from typing import Iterable, List, Optional, Sequence

from ..config import EVAL_BACKENDS
from ..errors import UsageError
from ..optional import MissingExtraError

FAST_EVAL_EXTRA = 'pip install "detr_irpe[fast-eval]"'


@dataclass(frozen=True)
class Backend:
    """One library: ``name`` (as ``eval.backend`` spells it), its import name, its distribution
    (pip) name, and the names of its ``COCO`` and ``COCOeval`` classes."""

    name: str
    module: str
    distribution: str
    coco: str
    cocoeval: str
    eval_kwargs: tuple = ()  # extra COCOeval keyword arguments as (name, value) pairs

    @property
    def installed(self) -> bool:
        try:
            return importlib.util.find_spec(self.module) is not None
        except (ImportError, ValueError):  # a module blocked in sys.modules
            return False

    @property
    def version(self) -> str:
        return importlib.metadata.version(self.distribution)

    def classes(self):
        """``(COCO, COCOeval)`` of the library (imported now: the core never loads the optional ones)."""
        try:
            lib = importlib.import_module(self.module)
        except ImportError as e:
            how = "pip install pycocotools" if self.name == "pycocotools" else FAST_EVAL_EXTRA
            raise MissingExtraError(f"eval.backend={self.name} needs {self.distribution}, which is not installed "
                                    f"({e}): {how}, or use eval.backend=auto") from None
        if self.name == "pycocotools":  # the package holds its classes in submodules
            lib = importlib.import_module("pycocotools.coco"), importlib.import_module("pycocotools.cocoeval")
            return lib[0].COCO, lib[1].COCOeval
        return getattr(lib, self.coco), getattr(lib, self.cocoeval)


PYCOCOTOOLS = Backend("pycocotools", "pycocotools", "pycocotools", "COCO", "COCOeval")
# evaluate() holds only the accumulated arrays unless asked for evalImgs (the confusion matrix asks)
ULTRAFAST = Backend("ultrafast", "ultrafast_pycocotools", "ultrafast-pycocotools", "COCO", "COCOeval")
FASTER_COCO_EVAL = Backend("faster-coco-eval", "faster_coco_eval", "faster-coco-eval", "COCO", "COCOeval_faster",
                           (("print_function", print),))  # its default logs the table instead
BACKENDS = {b.name: b for b in (PYCOCOTOOLS, ULTRAFAST, FASTER_COCO_EVAL)}
FASTEST_FIRST = ("ultrafast", "faster-coco-eval", "pycocotools")  # measured: benchmarks/eval_speed.py

# Libraries that give other bits than pycocotools, and why; they are refused (the test that finds
# the difference keeps this entry honest: it fails once a release becomes exact).
NOT_EXACT = {
    "faster-coco-eval": (
        "faster-coco-eval computes precision as tp / (tp + fp) where pycocotools divides by tp + fp + 2**-52, "
        "so wherever a category's best-scored detection is its only leading true positive it reports 1.0 "
        "instead of 0.9999999999999998, and AP and per-class AP differ in the last bits"),
}


def resolve_backend(name: str = "auto") -> Backend:
    """The :class:`Backend` that ``eval.backend=name`` means: ``auto`` is the fastest installed one
    that gives pycocotools' bits; a named one must be installed and exact."""
    if name not in EVAL_BACKENDS:
        raise UsageError(f"unknown evaluation backend {name!r}: choose one of {', '.join(EVAL_BACKENDS)}")
    if name == "auto":
        return next(BACKENDS[n] for n in FASTEST_FIRST if n not in NOT_EXACT and BACKENDS[n].installed)
    if name in NOT_EXACT:
        raise UsageError(f"eval.backend={name} is refused: {NOT_EXACT[name]}. This project's metrics must equal "
                         f"pycocotools' (official DETR's); use eval.backend=ultrafast (bit-identical, faster) "
                         f"or pycocotools")
    backend = BACKENDS[name]
    backend.classes()  # a clear error now when it is missing
    return backend


def describe(backend: Backend, asked: str) -> str:
    """One log line: which library computes the AP, and why it was chosen."""
    why = "auto: the fastest installed backend identical to pycocotools" if asked == "auto" else "eval.backend"
    return f"COCO evaluation: {backend.distribution} {backend.version} ({why})"


def load_ground_truth(backend: Backend, dataset: dict):
    """The library's ``COCO`` of an annotations dict (the dict is not modified)."""
    coco_cls, _ = backend.classes()
    with contextlib.redirect_stdout(io.StringIO()):  # progress lines
        gt = coco_cls()
        # pycocotools rewrites polygons as RLE in place when it evaluates masks; the others leave them
        gt.dataset = copy.deepcopy(dataset) if backend is PYCOCOTOOLS else dataset
        gt.createIndex()
    return gt


def run_cocoeval(backend: Backend, coco_gt, results: List[dict], iou_type: str, image_ids: Sequence[int], *,
                 use_cats: bool = True, max_dets: Optional[Iterable[int]] = None, eval_imgs: bool = False):
    """``COCOeval`` of ``results`` (COCO result dicts, not modified) against ``coco_gt`` (this
    backend's ``COCO``) on ``image_ids``, evaluated and accumulated (``summarize()`` not yet run).

    ``use_cats=False``: class-agnostic matching; ``max_dets``: the detections per image kept;
    ``eval_imgs``: fill ``evalImgs`` (per image, category and area range: which detection matched
    which ground truth at each IoU threshold), as pycocotools always does.
    """
    _, cocoeval_cls = backend.classes()
    kwargs = dict(backend.eval_kwargs)
    if eval_imgs and backend is ULTRAFAST:
        kwargs["store_eval_imgs"] = True
    elif eval_imgs and backend is not PYCOCOTOOLS:
        raise UsageError(f"{backend.name} does not keep evalImgs (which detection matched which ground truth)")
    with contextlib.redirect_stdout(io.StringIO()):  # progress lines
        # loadRes adds keys to the dicts it is given: keep the caller's as they are
        coco_dt = coco_gt.loadRes([dict(r) for r in results])
        coco_eval = cocoeval_cls(coco_gt, coco_dt, iou_type, **kwargs)
        coco_eval.params.imgIds = list(image_ids)
        coco_eval.params.useCats = int(use_cats)
        if max_dets is not None:
            coco_eval.params.maxDets = list(max_dets)
        coco_eval.evaluate()
        coco_eval.accumulate()
    return coco_eval


def summary_table(coco_eval) -> str:
    """``coco_eval.summarize()`` (fills ``coco_eval.stats``); returns the table it prints."""
    table = io.StringIO()
    with contextlib.redirect_stdout(table):
        coco_eval.summarize()
    return table.getvalue().rstrip()
