"""TensorBoard event files of a training run (``train.tensorboard: true``), beside ``log.jsonl``:
every loss term and the learning rates every ``train.log_every`` iterations, the 12 COCO numbers
of each evaluation, and at each evaluation a few validation images with their predicted and
ground-truth boxes, and the pictures that explain the AP (``eval_pictures/``: per-class AP, PR
curves, confusion matrix, sizes). Written by the main process only.

    tensorboard --logdir outputs/run/tensorboard
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Tuple

from torch import Tensor, nn
from torchvision.io import ImageReadMode, read_image

from ..config import DataConfig
from ..data.coco import CocoDetection
from ..evaluation import METRIC_NAMES, SEGM
from ..optional import require
from ..visualize.boxes import prediction_vs_ground_truth
from ..visualize.forward import run_model


def validation_pictures(model: nn.Module, postprocessor: nn.Module, dataset: CocoDetection, data_cfg: DataConfig,
                        count: int, device, threshold: float = 0.5) -> List[Tuple[str, Tensor]]:
    """``(name, (3, H, W) uint8 picture)`` of the first ``count`` validation images (resized for
    the model as ``data_cfg`` says): the predictions scoring at least ``threshold`` beside the
    ground truth."""
    pictures = []
    for index in range(min(count, len(dataset))):
        name, image, truth = dataset.ground_truth_sample(index)
        result = run_model(model, postprocessor, data_cfg, image, device)
        pictures.append((name, prediction_vs_ground_truth(result.image, result.detections(threshold), truth,
                                                         dataset.categories)))
    return pictures


class TensorBoardWriter:
    """A ``SummaryWriter`` under ``log_dir`` when ``enabled``, else nothing at all."""

    def __init__(self, log_dir: Path, enabled: bool):
        self.writer = None
        if enabled:
            require("tensorboard", "train.tensorboard=true")  # an optional extra: only when asked for
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(log_dir))

    def training(self, losses: Dict[str, float], learning_rates: Dict[str, float], step: int) -> None:
        """The loss terms (``train/<name>``) and the learning rate of each group (``lr/<group>``)."""
        if self.writer is None:
            return
        for name, value in losses.items():
            self.writer.add_scalar(f"train/{name}", value, step)
        for group, lr in learning_rates.items():
            self.writer.add_scalar(f"lr/{group}", lr, step)

    def evaluation(self, metrics: Dict[str, float], pictures: List[Tuple[str, Tensor]], step: int) -> None:
        """The 12 COCO numbers (``val/AP`` ...; of the masks too, ``val/segm_AP`` ..., for a
        segmentation model) and the pictures (``val_images/<name>``)."""
        if self.writer is None:
            return
        for name in METRIC_NAMES + tuple(SEGM + n for n in METRIC_NAMES):
            if name in metrics:
                self.writer.add_scalar(f"val/{name}", metrics[name], step)
        for name, picture in pictures:
            self.writer.add_image(f"val_images/{name}", picture, step, dataformats="CHW")
        self.writer.flush()

    def evaluation_pictures(self, pictures: Dict[str, str], step: int) -> None:
        """The evaluation's PNGs (``{name: path}``, see :func:`~detr_irpe.engine.evaluate.evaluate`)
        as ``eval/<name>`` images."""
        if self.writer is None or not pictures:
            return
        for name, path in pictures.items():
            self.writer.add_image(f"eval/{name}", read_image(str(path), ImageReadMode.RGB), step, dataformats="CHW")
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
