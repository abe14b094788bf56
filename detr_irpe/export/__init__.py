"""Deployment: ONNX and ``torch.export`` programs of a detector, with a sidecar JSON, and an onnxruntime runner.

* :func:`export_checkpoint` / :func:`export_detector` — write ``model.onnx`` (or ``model.pt2``) and
  its sidecar ``model.onnx.json`` (``model.pt2.json``), checked against PyTorch on a padded batch of a
  size not used to trace.
* :func:`export_program` — the ``torch.export`` program (dynamic batch, height, width), to convert yourself;
  a segmentation model's has a third output, ``pred_masks``.
* :class:`OnnxDetector` — onnxruntime with the evaluation preprocessing and PyTorch's post-processing;
  its ``predict`` is ``Detector.predict``'s twin.

onnx, onnxscript and onnxruntime (the ``[export]`` extra) are imported by the functions that use them,
never by ``import detr_irpe.export``.
"""
from .exporter import (
    DEFAULT_OPSET, FORMATS, ONNX_OPSETS, ExportMismatchError, ExportResult, export_checkpoint, export_detector,
    save_onnx, save_program,
)
from .preprocess import Preprocessing
from .program import INPUT_NAMES, MASK_OUTPUT, OUTPUT_NAMES, DetectorOutputs, InputLimits, export_program, output_names
from .records import detection_records
from .runtime import OnnxDetector, UnsupportedImageError, onnx_session, run_onnx
from .sidecar import find_sidecar, read_sidecar, sidecar_path

__all__ = [
    "export_checkpoint", "export_detector", "export_program", "save_onnx", "save_program", "ExportResult",
    "ExportMismatchError", "OnnxDetector", "UnsupportedImageError", "onnx_session", "run_onnx", "Preprocessing",
    "DetectorOutputs", "InputLimits", "read_sidecar", "find_sidecar", "sidecar_path", "detection_records",
    "INPUT_NAMES", "OUTPUT_NAMES", "MASK_OUTPUT", "output_names", "FORMATS", "ONNX_OPSETS", "DEFAULT_OPSET",
]
