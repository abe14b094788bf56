"""Run an exported ONNX detector with onnxruntime: preprocessing and post-processing as in PyTorch.

    detector = OnnxDetector("model.onnx")              # reads model.json beside it
    detections = detector.detect([read_rgb("photo.jpg")])   # per image: scores, labels, boxes (pixels)
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Sequence

import onnxruntime
import torch
from torch import Tensor

from ..errors import CheckpointError, InputNotFoundError, UsageError
from ..models.postprocess import PostProcess
from .preprocess import Preprocessing
from .program import INPUT_NAMES, OUTPUT_NAMES
from .sidecar import read_sidecar, sidecar_path


def onnx_session(path, providers: Optional[Sequence[str]] = None,
                 options: Optional[onnxruntime.SessionOptions] = None) -> onnxruntime.InferenceSession:
    """An onnxruntime session of the model at ``path`` (CPU unless ``providers`` says otherwise)."""
    return onnxruntime.InferenceSession(str(path), sess_options=options,
                                        providers=list(providers or ["CPUExecutionProvider"]))


def run_onnx(session: onnxruntime.InferenceSession, images: Tensor, mask: Tensor) -> Dict[str, Tensor]:
    """``images (B, 3, H, W)`` float, ``mask (B, H, W)`` bool -> ``pred_logits``, ``pred_boxes`` as tensors."""
    feeds = {INPUT_NAMES[0]: images.detach().to("cpu", torch.float32).contiguous().numpy(),
             INPUT_NAMES[1]: mask.detach().to("cpu", torch.bool).contiguous().numpy()}
    outputs = session.run(list(OUTPUT_NAMES), feeds)
    return {name: torch.from_numpy(value) for name, value in zip(OUTPUT_NAMES, outputs)}


class OnnxDetector:
    """An exported ONNX detector with its sidecar: raw forward, or images in and detections out.

    Args:
        model_path: the ``.onnx`` file written by :func:`detr_irpe.export.export_detector`.
        sidecar: its JSON (default: beside it, ``model.json`` for ``model.onnx``).
        providers: onnxruntime execution providers (default CPU).
        options: onnxruntime ``SessionOptions`` (threads etc.).

    Attributes:
        info: the sidecar's content; ``categories``: ``{label: class name}``;
        preprocess: ``(3, H, W)`` uint8 -> normalised ``(3, h, w)`` float, as evaluation images.
    """

    def __init__(self, model_path, sidecar=None, providers: Optional[Sequence[str]] = None,
                 options: Optional[onnxruntime.SessionOptions] = None):
        self.model_path = Path(model_path)
        if not self.model_path.is_file():
            raise InputNotFoundError(f"no ONNX model at {self.model_path}: write one with "
                                     f"`detr-irpe export --checkpoint CKPT --out {self.model_path.name}`")
        self.info = read_sidecar(sidecar if sidecar is not None else sidecar_path(model_path))
        if self.info["format"] != "onnx":
            raise UsageError(f"{self.model_path} is described as a {self.info['format']!r} export; OnnxDetector runs "
                             f"ONNX files (load a .pt2 program with torch.export.load)")
        self.preprocess = Preprocessing.from_dict(self.info["preprocess"])
        self.categories = {int(k): str(v) for k, v in self.info["categories"].items()}
        try:
            self.session = onnx_session(self.model_path, providers, options)
        except Exception as e:  # onnxruntime raises its own classes (InvalidProtobuf, Fail, ...)
            raise CheckpointError(f"ONNX Runtime cannot load {self.model_path} ({type(e).__name__}: "
                                  f"{str(e).strip()[:300]}); export it again") from None
        self._postprocess = PostProcess()

    def forward(self, images: Tensor, mask: Tensor) -> Dict[str, Tensor]:
        """The exported model on a padded batch: ``images (B, 3, H, W)``, ``mask (B, H, W)`` True on
        padding -> ``pred_logits (B, Q, K + 1)``, ``pred_boxes (B, Q, 4)`` normalised cxcywh."""
        sides = self.info["input_size"]
        h, w = images.shape[-2:]
        if min(h, w) < sides["min_side"] or (sides["max_side"] is not None and max(h, w) > sides["max_side"]):
            most = f"at most {sides['max_side']}" if sides["max_side"] is not None else "any size"
            raise UsageError(f"this export takes sides from {sides['min_side']} pixels ({most}); got a {h} x {w} batch")
        return run_onnx(self.session, images, mask)

    __call__ = forward

    def detect(self, images: Sequence[Tensor], batch_size: Optional[int] = None) -> List[Dict[str, Tensor]]:
        """Detections of ``(3, H_i, W_i)`` uint8 RGB images.

        Images are resized like evaluation images, then run ``batch_size`` at a time (default: all),
        each batch holding images of one resized size only. The graph runs the CNN on the batch as
        given, so a batch without padding is what makes an image's detections independent of the
        others, as PyTorch's per-image backbone does (tested equal to 1e-4).

        Returns per image ``{"scores": (Q,), "labels": (Q,) int64, "boxes": (Q, 4)}``, boxes as absolute
        ``(x1, y1, x2, y2)`` in the original image, as :class:`~detr_irpe.models.postprocess.PostProcess`.
        """
        inputs = [self.preprocess(image) for image in images]
        by_size: Dict[tuple, List[int]] = {}
        for i, x in enumerate(inputs):
            by_size.setdefault(tuple(x.shape[-2:]), []).append(i)
        step = max(batch_size or len(inputs), 1)
        results: List[Optional[Dict[str, Tensor]]] = [None] * len(inputs)
        for indices in by_size.values():
            for start in range(0, len(indices), step):
                chunk = indices[start:start + step]
                batch = torch.stack([inputs[i] for i in chunk])
                mask = torch.zeros(batch.shape[0], *batch.shape[-2:], dtype=torch.bool)
                sizes = torch.tensor([tuple(images[i].shape[-2:]) for i in chunk])
                for i, found in zip(chunk, self._postprocess(self.forward(batch, mask), sizes)):
                    results[i] = found
        return results
