"""Export a detector to ONNX or a ``torch.export`` program, write its sidecar JSON, check it against PyTorch.

Every export is checked before it is reported done: the written file is loaded back (onnxruntime
for ONNX, ``torch.export.load`` for a program) and run on a padded batch of a size it was not
traced with; if its outputs are not PyTorch's, :class:`ExportMismatchError` is raised.

ONNX needs onnx, onnxscript and onnxruntime (the ``[export]`` extra); they are imported when an ONNX
export starts, not with this module, so a ``torch.export`` program needs none of them.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import torch
from torch import Tensor
from torch.export import ExportedProgram

from ..engine.inference import LoadedDetector, load_detector
from ..errors import DetrIrpeError, UsageError
from ..files import OutputError, check_writable, describe_os_error, output_mode, refuse_existing, refuse_inputs
from ..optional import require
from .preprocess import Preprocessing
from .program import (INPUT_NAMES, MASK_OUTPUT, OUTPUT_NAMES, InputLimits, encoder_irpe_specs, export_program,
                      output_names, sample_inputs)
from .runtime import onnx_session, run_onnx
from .sidecar import deployment_info, sidecar_path, write_sidecar

FORMATS = {"onnx": ".onnx", "torch-export": ".pt2"}
# From opset 23 the exporter emits the ONNX Attention operator for the decoder's attention, whose padding
# mask onnxruntime 1.32 rejects; below 18 torch's exporter cannot write this graph (it converts down from 18
# and either fails or leaves opset 18).
ONNX_OPSETS = range(18, 23)
DEFAULT_OPSET = 20
ONNX_LIBRARIES = ("onnx", "onnxscript", "onnxruntime")  # torch's exporter, its optimizer, the check
# The check of an export: far above float32 rounding between runtimes (measured 1e-6), far below what a
# wrong bucket mapping or a frozen shape moves.
CHECK_ATOL = 1e-3


class ExportMismatchError(DetrIrpeError, RuntimeError):
    """The exported model's outputs differ from PyTorch's on the check inputs."""


@dataclass
class ExportResult:
    """What :func:`export_detector` wrote.

    Attributes:
        model_path, sidecar_path: the files.
        format: ``onnx`` or ``torch-export``.
        opset: the ONNX opset (None for a program).
        seconds: wall time of tracing, conversion and saving (the check excluded).
        max_abs_diff: per output, the largest difference to PyTorch on the check inputs.
        program: the ``torch.export`` program the file was made from.
    """

    model_path: Path
    sidecar_path: Path
    format: str
    opset: Optional[int]
    seconds: float
    max_abs_diff: Dict[str, float] = field(default_factory=dict)
    program: Optional[ExportedProgram] = None


def check_options(out, fmt: str, opset: Optional[int], overwrite: bool = False) -> Optional[int]:
    """Validate the output path, format and opset; returns the opset to use (None for torch-export).

    Without ``overwrite`` an existing model file or sidecar at ``out`` is refused.

    Raises:
        MissingExtraError: ONNX without the ``[export]`` extra's libraries.
    """
    if fmt not in FORMATS:
        raise UsageError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if fmt == "onnx":
        for module in ONNX_LIBRARIES:
            require(module, "export to ONNX")
    out = Path(out)
    if out.is_dir():
        raise UsageError(f"--out {out} is a folder: name the model file to write, e.g. {out / ('model' + FORMATS[fmt])}")
    if not overwrite:
        refuse_existing([out, sidecar_path(out)], "pass --overwrite to replace them, or choose another --out")
    if out.suffix == ".json":
        raise UsageError(f"--out {out} has the name of a sidecar JSON (an export writes "
                         f"{sidecar_path('model' + FORMATS[fmt]).name} beside model{FORMATS[fmt]}); name the model "
                         f"file {out.with_suffix(FORMATS[fmt]).name}")
    if fmt == "torch-export":
        if opset is not None:
            raise UsageError("--opset applies to ONNX only; drop it for --format torch-export")
        return None
    opset = DEFAULT_OPSET if opset is None else int(opset)
    if opset not in ONNX_OPSETS:
        raise UsageError(f"ONNX opset {opset} is not supported: use {ONNX_OPSETS.start}-{ONNX_OPSETS.stop - 1}. "
                         f"Below 18 torch's exporter cannot write DETR's graph (LayerNormalization, Split); from 23 "
                         f"the decoder's attention becomes the ONNX Attention operator, whose padding mask "
                         f"onnxruntime {require('onnxruntime', 'export to ONNX').__version__} rejects")
    return opset


def program_output_names(program: ExportedProgram) -> Tuple[str, ...]:
    """The output names of a program of :func:`export_program`: ``pred_logits``, ``pred_boxes`` and, when it
    has a third output (a segmentation model), ``pred_masks``."""
    return (*OUTPUT_NAMES, MASK_OUTPUT)[:len(program.graph_signature.user_outputs)]


def save_onnx(program: ExportedProgram, path, opset: int = DEFAULT_OPSET) -> Path:
    """Convert a program of :func:`export_program` to ONNX at ``opset`` and save it (weights inside the file
    up to 2 GB, beside it beyond)."""
    for module in ("onnx", "onnxscript"):  # what torch.onnx.export(dynamo=True) imports
        require(module, "export to ONNX")
    # onnxscript's optimizer warns once per Split of a weight (the in-projections) that it leaves it unfolded
    folding = logging.getLogger("onnxscript.optimizer._constant_folding")
    level = folding.level
    folding.setLevel(logging.ERROR)
    try:
        onnx_program = torch.onnx.export(program, input_names=list(INPUT_NAMES),
                                         output_names=list(program_output_names(program)),
                                         opset_version=opset, dynamo=True, verbose=False)
    finally:
        folding.setLevel(level)
    onnx_program.save(str(path))
    return Path(path)


def save_program(program: ExportedProgram, path) -> Path:
    """``torch.export.save`` (a ``.pt2`` file)."""
    torch.export.save(program, str(path))
    return Path(path)


def _check(run, model: torch.nn.Module, images: Tensor, mask: Tensor, what: str) -> Dict[str, float]:
    """Max |exported - PyTorch| per output; raises :class:`ExportMismatchError` beyond ``CHECK_ATOL``."""
    with torch.no_grad():
        want = model(images, mask)
        got = run(images, mask)
    diffs = {name: float((got[name] - want[name]).abs().max()) for name in output_names(model)}
    if not all(d <= CHECK_ATOL for d in diffs.values()):  # also catches NaN
        raise ExportMismatchError(f"the exported {what} disagrees with the PyTorch model on a padded batch of "
                                  f"shape {tuple(images.shape)}: max |difference| {diffs} (tolerance {CHECK_ATOL}); "
                                  f"the file is removed")
    return diffs


def export_detector(detector: LoadedDetector, out, fmt: str = "onnx", opset: Optional[int] = None,
                    overwrite: bool = False) -> ExportResult:
    """Export ``detector.model`` to ``out`` (ONNX, or a ``torch.export`` program) and write the sidecar JSON
    beside it, named after it (``model.onnx.json``, :func:`~detr_irpe.export.sidecar.sidecar_path`).

    The model must be a float32 model on the CPU (``load_detector(..., device="cpu")``); it is put in
    eval mode. Inputs ``images (batch, 3, height, width)`` float32 and ``mask (batch, height, width)``
    bool, outputs ``pred_logits (batch, Q, K + 1)`` and ``pred_boxes (batch, Q, 4)``, and for a
    segmentation model ``pred_masks (batch, Q, height / 4, width / 4)`` (mask logits); batch, height and
    width are dynamic (sides from ``backbone stride + 1`` pixels; at most ``50 x stride`` with a learned
    position embedding).

    The model file is written under a temporary name and renamed once it passed the check, so a
    failed export leaves an earlier file at ``out`` as it was.

    Raises:
        UsageError: a bad format, opset, output path or model device / dtype.
        OutputExistsError: ``out`` or its sidecar exists and ``overwrite`` is not set.
        ExportMismatchError: the written file does not compute what the model computes.
        MissingExtraError: ONNX without the ``[export]`` extra (onnx, onnxscript, onnxruntime).
    """
    opset = check_options(out, fmt, opset, overwrite)
    model = detector.model.eval()
    params = list(model.parameters())
    if any(p.device.type != "cpu" or p.dtype != torch.float32 for p in params):
        raise UsageError("export a float32 model on the CPU: load it with load_detector(..., device='cpu')")
    out = Path(out)
    check_writable(out.parent)
    limits = InputLimits.of(model)
    written = out.with_name(f".{out.stem}.exporting{out.suffix}")

    start = time.perf_counter()
    program = export_program(model)
    try:
        if fmt == "onnx":
            save_onnx(program, written, opset)
        else:
            save_program(program, written)
        seconds = time.perf_counter() - start
        images, mask = sample_inputs(2, limits.sample_sizes(model.backbone.stride)[1], seed=1)
        if fmt == "onnx":
            session = onnx_session(written)
            diffs = _check(lambda x, m: run_onnx(session, x, m), model, images, mask, "ONNX model")
            runtime = f"onnxruntime {require('onnxruntime', 'export to ONNX').__version__}"
        else:
            loaded = torch.export.load(str(written)).module()
            names = output_names(model)
            diffs = _check(lambda x, m: dict(zip(names, loaded(x, m))), model, images, mask, "program")
            runtime = "torch.export.load"
        os.chmod(written, output_mode())
        os.replace(written, out)
    except OSError as e:
        raise OutputError(describe_os_error(e, out)) from e
    finally:
        written.unlink(missing_ok=True)

    cfg = detector.config
    info = deployment_info(
        model_file=out.name, fmt=fmt, opset=opset,
        preprocess=Preprocessing(cfg.data.eval_size, cfg.data.max_size),
        categories=detector.categories, num_classes=model.num_classes, num_queries=model.num_queries,
        masks=MASK_OUTPUT in output_names(model), limits=limits, stride=model.backbone.stride, irpe=encoder_irpe_specs(model),
        check={"runtime": runtime, "input_shape": list(images.shape), "padded": True,
               "max_abs_diff": diffs, "tolerance": CHECK_ATOL},
    )
    side = write_sidecar(info, sidecar_path(out))
    return ExportResult(out, side, fmt, opset, seconds, diffs, program)


def export_checkpoint(checkpoint: str, out, fmt: str = "onnx", opset: Optional[int] = None,
                      config_path: Optional[str] = None, overrides: Sequence[str] = (),
                      overwrite: bool = False) -> ExportResult:
    """:func:`export_detector` of any checkpoint ``tools/eval.py`` accepts (path or URL); never
    written over the checkpoint itself."""
    check_options(out, fmt, opset, overwrite)  # before the (possibly long) load
    refuse_inputs([out, sidecar_path(out)], [checkpoint], "choose another --out")
    return export_detector(load_detector(checkpoint, config_path, overrides, device="cpu"), out, fmt, opset,
                           overwrite)
