"""COCO evaluation of a model over a dataset (any number of processes)."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional

import torch
from torch import nn
from tqdm import tqdm

from ..data import build_dataloader, build_dataset
from ..evaluation import CocoEvaluator
from . import distributed as du
from .inference import load_detector
from .step import autocast_context, to_device


@torch.no_grad()
def predict_dataset(model: nn.Module, postprocessor: nn.Module, dataset, device: torch.device,
                    batch_size: int = 2, num_workers: int = 0, amp: str = "none", quiet: bool = False,
                    backbone_per_image: bool = True) -> Dict[int, dict]:
    """Detections of this process's share of ``dataset``: ``{image_id: {scores, labels, boxes}}``.

    Boxes are absolute ``(x1, y1, x2, y2)`` in the original image size. With
    ``backbone_per_image`` (the default) the CNN sees each image unpadded, so an image's
    detections do not depend on the batch size or on what it is batched with.
    """
    model.eval()
    loader = build_dataloader(dataset, batch_size, train=False, num_workers=num_workers)
    detections: Dict[int, dict] = {}
    for images, masks, targets in tqdm(loader, desc="eval", disable=quiet or not du.is_main_process(),
                                       leave=False, dynamic_ncols=True):
        images, masks, targets = to_device(images, masks, targets, device)
        with autocast_context(device, amp):
            outputs = model(images, masks, backbone_per_image=backbone_per_image)
        outputs = {k: v.float() for k, v in outputs.items() if k in ("pred_logits", "pred_boxes")}
        sizes = torch.stack([t["orig_size"] for t in targets])
        for target, result in zip(targets, postprocessor(outputs, sizes)):
            detections[int(target["image_id"])] = {k: v.cpu() for k, v in result.items()}
    return detections


def evaluate(model: nn.Module, postprocessor: nn.Module, dataset, device: torch.device, batch_size: int = 2,
             num_workers: int = 0, output_dir: Optional[Path] = None, amp: str = "none",
             quiet: bool = False, backbone_per_image: bool = True, table: bool = True) -> dict:
    """COCO bbox mAP of ``model`` on ``dataset``; detections gathered from every process.

    Writes ``detections.json`` and ``metrics.json`` into ``output_dir`` (main process) and
    returns the metrics (the 12 standard numbers and per-class AP) on every process. Prints
    pycocotools' table and the per-class AP if ``table`` and not ``quiet``.
    """
    detections = predict_dataset(model, postprocessor, dataset, device, batch_size, num_workers, amp, quiet,
                                 backbone_per_image)
    evaluator = CocoEvaluator(dataset.coco)
    evaluator.update(detections)
    evaluator.synchronize()
    metrics = {}
    if du.is_main_process():
        metrics = evaluator.summarize(verbose=table and not quiet)
        if output_dir is not None:
            evaluator.write(output_dir)
    return du.broadcast_object(metrics)


def evaluate_checkpoint(checkpoint: str, config_path: Optional[str] = None, overrides=(),
                        output_dir: Optional[str] = None, device: str = "auto", batch_size: Optional[int] = None,
                        quiet: bool = False, batched_backbone: bool = False) -> dict:
    """COCO mAP of a checkpoint file (ours, official DETR, iRPE model zoo) on the config's val split.

    ``batched_backbone``: run the CNN on padded batches, as training does (see :func:`predict_dataset`).
    """
    torch_device = du.init_distributed(device)
    detector = load_detector(checkpoint, config_path, overrides, device=str(torch_device))
    cfg = detector.config
    dataset = build_dataset(cfg.data, "val")
    out = Path(output_dir or cfg.train.output_dir)
    metrics = evaluate(detector.model, detector.postprocessor, dataset, torch_device,
                       batch_size=batch_size or cfg.train.batch_size, num_workers=cfg.data.num_workers,
                       output_dir=out, amp=cfg.train.amp, quiet=quiet, backbone_per_image=not batched_backbone)
    du.cleanup_distributed()
    return metrics
