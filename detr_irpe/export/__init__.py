"""Deployment: ONNX and ``torch.export`` programs of a detector, with a sidecar JSON, and an onnxruntime runner.

* :func:`export_checkpoint` / :func:`export_detector` — write ``model.onnx`` (or ``model.pt2``) and
  ``model.json``, checked against PyTorch on a padded batch of a size not used to trace.
* :func:`export_program` — the ``torch.export`` program (dynamic batch, height, width), to convert yourself.
* :class:`OnnxDetector` — onnxruntime with the evaluation preprocessing and PyTorch's post-processing.
"""
from .exporter import (
    DEFAULT_OPSET, FORMATS, ONNX_OPSETS, ExportMismatchError, ExportResult, export_checkpoint, export_detector,
    save_onnx, save_program,
)
from .preprocess import Preprocessing
from .program import INPUT_NAMES, OUTPUT_NAMES, DetectorOutputs, InputLimits, export_program
from .runtime import OnnxDetector, onnx_session, run_onnx
from .sidecar import read_sidecar, sidecar_path

__all__ = [
    "export_checkpoint", "export_detector", "export_program", "save_onnx", "save_program", "ExportResult",
    "ExportMismatchError", "OnnxDetector", "onnx_session", "run_onnx", "Preprocessing", "DetectorOutputs",
    "InputLimits", "read_sidecar", "sidecar_path", "INPUT_NAMES", "OUTPUT_NAMES", "FORMATS", "ONNX_OPSETS",
    "DEFAULT_OPSET",
]
