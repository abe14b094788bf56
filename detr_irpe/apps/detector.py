"""The Python API for a trained detector: load a checkpoint, predict boxes (and masks), export it.

    from detr_irpe import Detector
    det = Detector.from_checkpoint("outputs/demo/checkpoint.pth")       # a path or an http(s) URL
    for found in det.predict("photo.jpg", threshold=0.7)[0]:
        print(found["name"], found["score"], found["box"])             # box: [x1, y1, x2, y2] in pixels
        # a segmentation model (model.masks) adds found["mask"]: (H, W) bool over the photo
    det.export_onnx("model.onnx")                                      # + model.onnx.json (preprocessing, names)
"""
from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import torch

from ..data.images import ImageLike, as_image_tensor  # as_image_tensor: also importable from here
from ..engine.distributed import pick_device
from ..engine.inference import LoadedDetector, load_detector
from ..export import ExportResult, detection_records, export_detector
from ..export.records import check_mask_format


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

    @property
    def has_masks(self) -> bool:
        """Whether the model predicts instance masks (a segmentation model, ``model.masks``)."""
        return bool(self.loaded.config.model.masks)

    def predict(self, images: Union[ImageLike, Sequence[ImageLike]], threshold: float = 0.7,
                batch_size: int = 1, masks: str = "tensor") -> List[List[dict]]:
        """Detections scoring at least ``threshold`` for each image (a path, PIL image, numpy array,
        uint8 or float tensor, or a list of them), best first: one list per image of
        ``{"box": [x1, y1, x2, y2], "score": float, "label": int, "name": str}``, boxes in the
        image's own pixels. A segmentation model adds ``"mask"``, the detection's mask over the
        image: a ``(H, W)`` bool tensor, or with ``masks="rle"`` COCO RLE (``{"size": [H, W],
        "counts": str}``, JSON-ready, as ``predict``'s ``detections.json``). The masks are the
        post-processor's (``sigmoid > 0.5`` at the image's size)."""
        check_mask_format(masks)
        single = not isinstance(images, (list, tuple))
        tensors = [as_image_tensor(image) for image in ([images] if single else images)]
        detections = self.loaded.detect(tensors, batch_size=batch_size)
        return [detection_records(d, threshold, self.categories, masks=masks) for d in detections]

    def export_onnx(self, path: Union[str, Path], opset: Optional[int] = None,
                    format: str = "onnx", overwrite: bool = False) -> ExportResult:
        """Write the model as ONNX (or ``format="torch-export"``: a ``.pt2`` program) with dynamic
        batch, height and width, and ``<path>.json`` beside it (``model.onnx.json``: class names,
        preprocessing; see :class:`detr_irpe.export.OnnxDetector`).
        The written file is checked against this model before it is kept (see
        :func:`detr_irpe.export.export_detector`). A model on a GPU is exported from a CPU copy.
        Existing files are replaced only with ``overwrite``."""
        loaded = self.loaded
        if loaded.device.type != "cpu":
            loaded = dataclasses.replace(loaded, model=copy.deepcopy(loaded.model).cpu())
        return export_detector(loaded, path, format, opset, overwrite=overwrite)
