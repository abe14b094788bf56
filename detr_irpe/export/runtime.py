"""Run an exported ONNX detector with onnxruntime: preprocessing and post-processing as in PyTorch.

    detector = OnnxDetector("model.onnx")              # reads model.onnx.json beside it
    found = detector.predict(["photo.jpg"], threshold=0.7)  # as Detector.predict: per image, best first
    detections = detector.detect([read_rgb("photo.jpg")])   # lower level: per image, every query's scores,
                                                            # labels, boxes (pixels)

onnxruntime (the ``[export]`` extra) is imported when a session is made, not with this module.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence, Union

import torch
from torch import Tensor

from ..data.images import ImageLike, as_image_tensor
from ..errors import CheckpointError, InputNotFoundError, UsageError
from ..models.postprocess import PostProcess
from ..models.segmentation import region_sizes
from ..optional import require
from .preprocess import Preprocessing
from .program import INPUT_NAMES, MASK_OUTPUT
from .records import check_mask_format, detection_records
from .sidecar import find_sidecar, read_sidecar

if TYPE_CHECKING:
    import onnxruntime


class UnsupportedImageError(UsageError):
    """An image whose resized size the exported model does not take (see ``input_size`` in its sidecar)."""


def onnx_session(path, providers: Optional[Sequence[str]] = None,
                 options: Optional["onnxruntime.SessionOptions"] = None) -> "onnxruntime.InferenceSession":
    """An onnxruntime session of the model at ``path`` (CPU unless ``providers`` says otherwise)."""
    ort = require("onnxruntime", "running an ONNX model")
    return ort.InferenceSession(str(path), sess_options=options, providers=list(providers or ["CPUExecutionProvider"]))


def run_onnx(session: "onnxruntime.InferenceSession", images: Tensor, mask: Tensor) -> Dict[str, Tensor]:
    """``images (B, 3, H, W)`` float, ``mask (B, H, W)`` bool -> ``pred_logits``, ``pred_boxes`` (and a
    segmentation model's ``pred_masks``: every output the model has) as tensors."""
    feeds = {INPUT_NAMES[0]: images.detach().to("cpu", torch.float32).contiguous().numpy(),
             INPUT_NAMES[1]: mask.detach().to("cpu", torch.bool).contiguous().numpy()}
    names = [output.name for output in session.get_outputs()]
    return {name: torch.from_numpy(value) for name, value in zip(names, session.run(names, feeds))}


class OnnxDetector:
    """An exported ONNX detector with its sidecar: raw forward, or images in and detections out.

    :meth:`predict` takes what :meth:`detr_irpe.Detector.predict` takes and returns the same records;
    :meth:`detect` is the lower level (uint8 tensors in, every query's detection out).

    Args:
        model_path: the ``.onnx`` file written by :func:`detr_irpe.export.export_detector`.
        sidecar: its JSON (default: beside it, ``model.onnx.json`` for ``model.onnx``; for an export
            made before that naming, ``model.json`` if it describes ``model.onnx``).
        providers: onnxruntime execution providers (default CPU).
        options: onnxruntime ``SessionOptions`` (threads etc.).

    Attributes:
        info: the sidecar's content; ``categories``: ``{label: class name}``;
        preprocess: ``(3, H, W)`` uint8 (or float in [0, 1]) -> normalised ``(3, h, w)`` float, as
            evaluation images.

    Raises:
        MissingExtraError: onnxruntime is not installed (``pip install "detr_irpe[export]"``).
    """

    def __init__(self, model_path, sidecar=None, providers: Optional[Sequence[str]] = None,
                 options: Optional["onnxruntime.SessionOptions"] = None):
        require("onnxruntime", "predict --onnx (OnnxDetector)")
        self.model_path = Path(model_path)
        if not self.model_path.is_file():
            raise InputNotFoundError(f"no ONNX model at {self.model_path}: write one with "
                                     f"`detr-irpe export --checkpoint CKPT --out {self.model_path.name}`")
        self.info = read_sidecar(sidecar if sidecar is not None else find_sidecar(model_path))
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

    @property
    def has_masks(self) -> bool:
        """Whether the export outputs ``pred_masks`` (a segmentation model)."""
        return any(output.get("name") == MASK_OUTPUT for output in self.info["outputs"])

    def forward(self, images: Tensor, mask: Tensor) -> Dict[str, Tensor]:
        """The exported model on a padded batch: ``images (B, 3, H, W)``, ``mask (B, H, W)`` True on
        padding -> ``pred_logits (B, Q, K + 1)``, ``pred_boxes (B, Q, 4)`` normalised cxcywh (and a
        segmentation model's ``pred_masks (B, Q, H4, W4)`` mask logits)."""
        sides = self.info["input_size"]
        h, w = images.shape[-2:]
        if min(h, w) < sides["min_side"] or (sides["max_side"] is not None and max(h, w) > sides["max_side"]):
            most = f"at most {sides['max_side']}" if sides["max_side"] is not None else "any size"
            raise UsageError(f"this export takes sides from {sides['min_side']} pixels ({most}); got a {h} x {w} batch")
        return run_onnx(self.session, images, mask)

    __call__ = forward

    def image_problem(self, image: Tensor) -> Optional[str]:
        """Why this export cannot run the ``(3, H, W)`` image, or None when it can: after the
        evaluation resize a side is below the export's minimum (an image of extreme aspect ratio, e.g.
        2000 x 40 pixels) or above its maximum (a learned position embedding).

        Padding such an image up to the minimum would run, but the graph's CNN would then see the
        padding, which PyTorch's per-image CNN never does: its detections would differ from
        ``predict --checkpoint``'s (on the tests' tiny models, up to 4e-4 in scores and 0.2 pixels in
        boxes), so the image is refused instead. (The minimum itself comes from ``torch.export``, which
        specialises a convolution whose output has one cell; see ``InputLimits``.)
        """
        sides = self.info["input_size"]
        height, width = image.shape[-2:]
        h, w = self.preprocess.resized_size(int(height), int(width))
        low, high = sides["min_side"], sides["max_side"]
        if min(h, w) >= low and (high is None or max(h, w) <= high):
            return None
        most = f" to {high}" if high is not None else ""
        return (f"the model input of this {height} x {width} image would be {h} x {w} pixels, and this export "
                f"takes sides from {low}{most} pixels (backbone stride {sides.get('backbone_stride', '?')}); "
                f"predict it with the PyTorch checkpoint (--checkpoint / Detector), which takes every size")

    def detect(self, images: Sequence[Tensor], batch_size: Optional[int] = None) -> List[Dict[str, Tensor]]:
        """Detections of ``(3, H_i, W_i)`` uint8 RGB images (or float in [0, 1]).

        Images are resized like evaluation images, then run ``batch_size`` at a time (default: all),
        each batch holding images of one resized size only. The graph runs the CNN on the batch as
        given, so a batch without padding is what makes an image's detections independent of the
        others, as PyTorch's per-image backbone does (tested equal to 1e-4).

        Returns per image ``{"scores": (Q,), "labels": (Q,) int64, "boxes": (Q, 4)}``, boxes as absolute
        ``(x1, y1, x2, y2)`` in the original image, and for a segmentation model ``"masks": (Q, H, W)``
        bool at the original size, as :class:`~detr_irpe.models.postprocess.PostProcess`.

        Raises:
            UnsupportedImageError: an image this export cannot take (:meth:`image_problem`), named by
                its position; nothing is run.
        """
        for i, image in enumerate(images):
            if not isinstance(image, Tensor) or image.dim() != 3:
                raise UsageError(f"detect() takes (3, H, W) image tensors, got {type(image).__name__} as image {i}; "
                                 f"predict() also takes paths, PIL images and arrays")
            problem = self.image_problem(image)
            if problem is not None:
                raise UnsupportedImageError(f"image {i}: {problem}")
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
                outputs = self.forward(batch, mask)
                if MASK_OUTPUT in outputs:
                    outputs["input_sizes"] = region_sizes(mask)
                for i, found in zip(chunk, self._postprocess(outputs, sizes)):
                    results[i] = found
        return results

    def predict(self, images: Union[ImageLike, Sequence[ImageLike]], threshold: float = 0.7,
                batch_size: int = 1, masks: str = "tensor") -> List[List[dict]]:
        """:meth:`detr_irpe.Detector.predict` with this export: detections scoring at least ``threshold``
        for each image (a path, PIL image, numpy array, uint8 or float tensor, or a list of them), best
        first, one list per image of ``{"box": [x1, y1, x2, y2], "score": float, "label": int,
        "name": str}``, boxes in the image's own pixels; an export with ``pred_masks`` adds ``"mask"``,
        a ``(H, W)`` bool tensor or, with ``masks="rle"``, COCO RLE.

        Raises:
            UnsupportedImageError: an image this export cannot take (:meth:`image_problem`), named by
                its path or position.
        """
        check_mask_format(masks)
        single = not isinstance(images, (list, tuple))
        given = [images] if single else list(images)
        tensors = [as_image_tensor(image) for image in given]
        for i, (image, tensor) in enumerate(zip(given, tensors)):
            problem = self.image_problem(tensor)
            if problem is not None:
                name = str(image) if isinstance(image, (str, Path)) else f"image {i}"
                raise UnsupportedImageError(f"{name}: {problem}")
        detections = self.detect(tensors, batch_size=batch_size)
        return [detection_records(d, threshold, self.categories, masks=masks) for d in detections]
