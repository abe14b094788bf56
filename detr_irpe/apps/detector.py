"""The Python API for a trained detector: load a checkpoint, predict boxes, export it.

    from detr_irpe import Detector
    det = Detector.from_checkpoint("outputs/demo/checkpoint.pth")       # a path or an http(s) URL
    for found in det.predict("photo.jpg", threshold=0.7)[0]:
        print(found["name"], found["score"], found["box"])             # box: [x1, y1, x2, y2] in pixels
    det.export_onnx("model.onnx")                                      # + model.json (preprocessing, names)
"""
from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from ..data.images import pil_to_rgb, read_rgb
from ..engine.distributed import pick_device
from ..engine.inference import LoadedDetector, load_detector
from ..errors import UsageError
from ..export import ExportResult, export_detector
from .predict import detection_records

ImageLike = Union[str, Path, Image.Image, Tensor, np.ndarray]


def as_image_tensor(image: ImageLike) -> Tensor:
    """``(3, H, W)`` RGB: uint8 for files, PIL images and uint8 arrays / tensors; a float tensor
    (values in [0, 1]) stays float. Arrays and tensors may also be ``(H, W, 3)``. Files and PIL images
    are read as photo viewers show them (EXIF orientation applied, any mode converted as predict does)."""
    if isinstance(image, (str, Path)):
        return read_rgb(image)
    if isinstance(image, Image.Image):
        return pil_to_rgb(image, exif=True)
    if isinstance(image, np.ndarray):
        image = torch.from_numpy(np.ascontiguousarray(image))
    if not isinstance(image, Tensor):
        raise UsageError(f"an image must be a file path, a PIL image, a numpy array or a tensor, "
                         f"got {type(image).__name__}")
    if image.dim() == 3 and image.shape[0] != 3 and image.shape[-1] == 3:
        image = image.permute(2, 0, 1)
    if image.dim() != 3 or image.shape[0] != 3:
        raise UsageError(f"an image tensor must be (3, H, W) or (H, W, 3) RGB, got shape {tuple(image.shape)}")
    if image.dtype == torch.uint8:
        return image.contiguous()
    if not image.is_floating_point():
        raise UsageError(f"an image tensor must be uint8 (0-255) or float (0-1), got {image.dtype}")
    if image.numel() and (image.min() < 0 or image.max() > 1):
        raise UsageError("a float image tensor must hold values in [0, 1]; pass uint8 for 0-255 values")
    return image.float().contiguous()


class Detector:
    """A detector loaded from a checkpoint (ours, official DETR, the iRPE model zoo; a path or URL).

    Predictions run the CNN on each image unpadded, so an image gets the same boxes whatever the
    batch size and whatever it is batched with.
    """

    def __init__(self, loaded: LoadedDetector):
        self.loaded = loaded

    @classmethod
    def from_checkpoint(cls, path_or_url: Union[str, Path], device: str = "auto", config: Optional[str] = None,
                        overrides: Sequence[str] = ()) -> "Detector":
        """Build the model the checkpoint describes; ``device="auto"`` takes a GPU when there is one."""
        return cls(load_detector(str(path_or_url), config, overrides, device=pick_device(device, "device")))

    @property
    def model(self) -> torch.nn.Module:
        return self.loaded.model

    @property
    def categories(self) -> Dict[int, str]:
        return self.loaded.categories

    def predict(self, images: Union[ImageLike, Sequence[ImageLike]], threshold: float = 0.7,
                batch_size: int = 1) -> List[List[dict]]:
        """Detections scoring at least ``threshold`` for each image (a path, PIL image, uint8 or
        float tensor, or a list of them), best first: one list per image of
        ``{"box": [x1, y1, x2, y2], "score": float, "label": int, "name": str}``, boxes in the
        image's own pixels."""
        single = not isinstance(images, (list, tuple))
        tensors = [as_image_tensor(image) for image in ([images] if single else images)]
        detections = self.loaded.detect(tensors, batch_size=batch_size)
        return [detection_records(d, threshold, self.categories) for d in detections]

    def export_onnx(self, path: Union[str, Path], opset: Optional[int] = None,
                    format: str = "onnx", overwrite: bool = False) -> ExportResult:
        """Write the model as ONNX (or ``format="torch-export"``: a ``.pt2`` program) with dynamic
        batch, height and width, and ``<path stem>.json`` beside it (class names, preprocessing).
        The written file is checked against this model before it is kept (see
        :func:`detr_irpe.export.export_detector`). A model on a GPU is exported from a CPU copy.
        Existing files are replaced only with ``overwrite``."""
        loaded = self.loaded
        if loaded.device.type != "cpu":
            loaded = dataclasses.replace(loaded, model=copy.deepcopy(loaded.model).cpu())
        return export_detector(loaded, path, format, opset, overwrite=overwrite)
