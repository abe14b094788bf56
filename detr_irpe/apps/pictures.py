"""From a checkpoint or log files to PNG files: what ``detr-irpe visualize`` (``tools/visualize.py``)
and ``tools/plot_logs.py`` do. Any checkpoint :func:`detr_irpe.engine.inference.load_detector`
reads works (ours, official DETR, the iRPE model zoo).

Images come from files / folders, or ``val=N``: the first N images of the validation split of
the checkpoint's (or ``config``'s) dataset, which also gives the ground-truth boxes (and, for a
segmentation model, the ground-truth masks). A segmentation model's masks are drawn under its boxes.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from ..data import build_dataset
from ..data.images import read_rgb
from ..engine.distributed import pick_device
from ..engine.inference import LoadedDetector, load_detector
from ..engine.logger import read_jsonl
from ..errors import InputNotFoundError, UsageError
from ..files import check_writable, refuse_existing, refuse_inputs
from ..visualize.attention import attention_picture, pixel_to_cell
from ..visualize.boxes import prediction_vs_ground_truth, save_png
from ..visualize.curves import plot_training_curves, run_names
from ..visualize.forward import display_scale, prepare_input, run_model
from ..visualize.rpe_tables import capture_token, plot_rpe_tables, rpe_attention_modules
from .predict import expand_inputs, output_names

Sample = Tuple[str, Tensor, Optional[Dict[str, Tensor]], Dict[int, str]]  # name, image, ground truth, class names


class Samples:
    """The images a picture command draws: the files of ``images`` (files or folders), then the first
    ``val`` validation images with their ground truth. Names (for the output files) are unique and
    known before any image is read, so that the outputs can be checked first."""

    def __init__(self, detector: LoadedDetector, images: Sequence = (), val: Optional[int] = None):
        if not images and not val:
            raise UsageError("nothing to draw: pass image files or folders, or --val N for the first N "
                             "validation images of the config's dataset")
        if val is not None and val < 0:
            raise UsageError(f"--val must be a positive number of images, got {val}")
        self.detector = detector
        self.paths = expand_inputs(images) if images else []  # fails on a bad path before any work
        self.dataset = build_dataset(detector.config.data, "val", masks=detector.config.model.masks) if val else None
        self.count = len(self.paths) + (min(val, len(self.dataset)) if self.dataset is not None else 0)
        files = list(self.paths)
        if self.dataset is not None:
            files += [Path(self.dataset.coco.imgs[image_id]["file_name"])
                      for image_id in self.dataset.ids[: self.count - len(self.paths)]]
        self.names = [Path(name).stem for name in output_names(files)]

    def outputs(self, out: Path, suffix: str) -> List[Path]:
        """The file each sample is drawn to: ``<out>/<name><suffix>``."""
        return [out / f"{name}{suffix}" for name in self.names]

    def __iter__(self) -> Iterator[Sample]:
        """``(name, (3, H, W) uint8 image, ground truth or None, class names)`` per image."""
        for name, path in zip(self.names, self.paths):
            yield name, read_rgb(path), None, self.detector.categories
        if self.dataset is not None:
            names = {**self.dataset.categories, **self.detector.categories}  # the checkpoint's names win
            for index, name in enumerate(self.names[len(self.paths):]):
                _, image, gt = self.dataset.ground_truth_sample(index)
                if self.dataset.masks:  # a segmentation model's ground truth: the instance masks too
                    gt["masks"] = self.dataset.load_target(index, tuple(image.shape[-2:]))["masks"].as_subclass(Tensor)
                yield name, image, gt, names


def check_picture_outputs(outputs: Sequence[Path], inputs: Sequence[Path], overwrite: bool) -> None:
    """Before any drawing: no output is an input image, none exists unless ``overwrite``, and the
    folder can be written."""
    refuse_inputs(outputs, inputs, "choose another --out")
    if not overwrite:
        refuse_existing(outputs, "pass --overwrite to replace them, or choose another --out")
    if outputs:
        check_writable(Path(outputs[0]).parent, "--out")


def draw_boxes(checkpoint: str, out, images: Sequence = (), val: Optional[int] = None, threshold: float = 0.7,
               min_size: Optional[int] = None, config: Optional[str] = None, overrides: Sequence[str] = (),
               device: str = "auto", overwrite: bool = False) -> List[Path]:
    """Writes ``<out>/<image>_boxes.png`` per image: the predicted boxes (score >= ``threshold``)
    with class names and scores (over their masks, for a segmentation model), beside the ground
    truth for validation images. Images whose
    shorter side is below ``min_size`` are drawn enlarged to it. Existing files are replaced only
    with ``overwrite``, input images never."""
    device = pick_device(device)
    detector = load_detector(checkpoint, config, overrides, device=device)
    todo = Samples(detector, images, val)
    check_picture_outputs(todo.outputs(Path(out), "_boxes.png"), todo.paths, overwrite)
    written = []
    for (name, image, gt, names), path in zip(todo, todo.outputs(Path(out), "_boxes.png")):
        result = run_model(detector.model, detector.postprocessor, detector.config.data, image, device)
        factor = display_scale(result.image_hw, min_size)
        result = result.scaled(factor)
        if gt is not None and factor != 1:
            fy, fx = result.image_hw[0] / image.shape[1], result.image_hw[1] / image.shape[2]
            gt = {**gt, "boxes": gt["boxes"] * torch.tensor([fx, fy, fx, fy])}
            if "masks" in gt:
                gt["masks"] = F.interpolate(gt["masks"][None].float(), size=result.image_hw, mode="nearest")[0].bool()
        picture = prediction_vs_ground_truth(result.image, result.detections(threshold), gt, names)
        save_png(picture, path)
        written.append(path)
    return written


def draw_attention(checkpoint: str, out, images: Sequence = (), val: Optional[int] = None,
                   pixel: Optional[Sequence[float]] = None, layer: Union[int, str] = -1, decoder_layer: int = -1,
                   threshold: float = 0.7, max_objects: int = 6, alpha: float = 0.5,
                   interpolation: str = "bilinear", min_size: Optional[int] = None, config: Optional[str] = None,
                   overrides: Sequence[str] = (), device: str = "auto", overwrite: bool = False) -> List[Path]:
    """Writes ``<out>/<image>_attention.png`` per image: the encoder self-attention of ``pixel``
    (``(x, y)`` in the image's pixels, default its centre) in encoder ``layer`` (``"all"``: one
    panel per layer), then the decoder cross-attention (``decoder_layer``) of each detection
    scoring ``>= threshold`` (at most ``max_objects``), each panel the size of the image (enlarged
    to a shorter side of ``min_size`` if smaller)."""
    device = pick_device(device)
    detector = load_detector(checkpoint, config, overrides, device=device)
    num_layers = detector.config.model.enc_layers
    layers = list(range(num_layers)) if layer == "all" else int(layer)
    todo = Samples(detector, images, val)
    check_picture_outputs(todo.outputs(Path(out), "_attention.png"), todo.paths, overwrite)
    written = []
    for (name, image, _, names), path in zip(todo, todo.outputs(Path(out), "_attention.png")):
        result = run_model(detector.model, detector.postprocessor, detector.config.data, image, device,
                           return_attention=True)
        result = result.scaled(display_scale(result.image_hw, min_size))
        picture = attention_picture(result, pixel, layers, decoder_layer, threshold, max_objects, names, alpha=alpha,
                                    interpolation=interpolation)
        save_png(picture, path)
        written.append(path)
    return written


def draw_rpe_tables(checkpoint: str, out, layers: Optional[Sequence[int]] = None, images: Sequence = (),
                    val: Optional[int] = None, pixel: Optional[Sequence[float]] = None,
                    config: Optional[str] = None, overrides: Sequence[str] = (), device: str = "auto",
                    overwrite: bool = False) -> List[Path]:
    """Writes ``<out>/rpe_tables.png`` (the learned tables of the chosen encoder ``layers``, all by
    default) and, given an image (the first of ``images`` / ``val``) or a ``pixel``, also
    ``<out>/rpe_query_<image>.png``: the contribution ``q·r`` of the token at ``pixel`` (default the
    image centre) per bucket.

    Raises:
        NoRPEError: the checkpoint's model has no iRPE.
    """
    device = pick_device(device)
    detector = load_detector(checkpoint, config, overrides, device=device)
    rpe_attention_modules(detector.model)  # NoRPEError before any other work
    out = Path(out)
    todo = None
    if images or val or pixel is not None:
        if not images and not val:
            raise UsageError("--pixel needs an image: pass an image file or --val 1")
        todo = Samples(detector, images, val)
    outputs = [out / "rpe_tables.png"] + ([out / f"rpe_query_{todo.names[0]}.png"] if todo else [])
    check_picture_outputs(outputs, todo.paths if todo else [], overwrite)
    written = [plot_rpe_tables(detector.model, outputs[0], layers)]
    if todo is not None:
        name, image, _, _ = next(iter(todo))
        H, W = image.shape[-2:]
        xy = pixel if pixel is not None else (W // 2, H // 2)
        batch, mask = prepare_input(image, detector.config.data)
        feature_hw = _feature_hw(detector, batch, mask, device)
        row, col = pixel_to_cell(xy, (H, W), tuple(batch.shape[-2:]), tuple(batch.shape[-2:]), feature_hw)
        tokens = capture_token(detector.model, batch.to(device), mask.to(device), row * feature_hw[1] + col)
        title = (f"iRPE contribution to the attention logits of the token at pixel ({int(xy[0])}, {int(xy[1])}) "
                 f"= cell ({row}, {col}) of {name}")
        written.append(plot_rpe_tables(detector.model, outputs[1], layers, tokens, title=title))
    return written


@torch.no_grad()
def _feature_hw(detector: LoadedDetector, batch: Tensor, mask: Tensor, device: str) -> Tuple[int, int]:
    features, _, _ = detector.model.backbone(batch.to(device), mask.to(device))
    return int(features.shape[-2]), int(features.shape[-1])


def plot_logs(logs: Sequence, out, names: Optional[Sequence[str]] = None, title: Optional[str] = None,
              overwrite: bool = False) -> Path:
    """Training curves of one or more runs in one PNG, a colour per run (named by its folder unless
    ``names`` are given). A run is its ``log.jsonl`` or its folder. An existing ``out`` is replaced
    only with ``overwrite``, a log never."""
    paths = [Path(p) / "log.jsonl" if Path(p).is_dir() else Path(p) for p in logs]
    if not paths:
        raise UsageError("give at least one log.jsonl or run folder")
    for p in paths:
        if not p.is_file():
            raise InputNotFoundError(f"no such log file: {p} (a training run writes <output_dir>/log.jsonl; "
                                     f"pass that file or the run's folder)")
    names = list(names) if names else run_names(paths)
    if len(names) != len(paths):
        raise UsageError(f"got {len(names)} names for {len(paths)} logs")
    out = Path(out)
    if out.is_dir():
        raise UsageError(f"--out {out} is a folder: name the PNG file to write, e.g. {out / 'curves.png'}")
    check_picture_outputs([out], paths, overwrite)
    return plot_training_curves({n: read_jsonl(p) for n, p in zip(names, paths)}, out, title=title)
