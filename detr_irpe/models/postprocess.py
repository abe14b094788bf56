"""Turn DETR's raw outputs into scored boxes (and, for a segmentation model, masks) in original image pixels."""
from __future__ import annotations

import io
from typing import Dict, List, Mapping, Optional

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from ..panoptic_png import id_to_rgb, rgb_to_id
from .box_checks import cxcywh_to_xyxy

SMALL_SEGMENT = 4  # a segment of at most this many pixels (at the original size) is removed, as DETR does


class PostProcessSegm(nn.Module):
    """Binary masks at each image's original size from ``pred_masks`` (mask logits at stride 4).

    As DETR's ``PostProcessSegm``: the logits are upsampled (bilinear) to the model's input
    size, thresholded (``sigmoid > threshold``), cropped to the image and resized (nearest) to its
    original size. Two cases, by what the outputs hold:

    * ``pred_masks`` of a padded batch (``batched_backbone=True``): DETR's procedure exactly, the
      padded map upsampled to the largest input size of the batch, then each image cropped.
    * ``pred_masks_sizes`` given (``batched_backbone=False``: the mask head ran on each image
      alone): each image's own region is upsampled to its own input size, so that its masks do
      not depend on the batch. For an image alone both are the same.
    """

    def __init__(self, threshold: float = 0.5):
        super().__init__()
        self.threshold = threshold

    @torch.no_grad()
    def forward(self, outputs: Dict[str, Tensor], target_sizes: Tensor) -> List[Tensor]:
        """
        Args:
            outputs: ``pred_masks`` ``(B, Q, h, w)``, ``input_sizes`` ``(B, 2)`` each image's unpadded
                ``(height, width)`` at the model's input, optionally ``pred_masks_sizes`` ``(B, 2)``.
            target_sizes: ``(B, 2)`` each image's original ``(height, width)``.

        Returns:
            Per image ``(Q, height, width)`` bool masks.
        """
        logits = outputs["pred_masks"].float()
        input_sizes = [tuple(int(v) for v in s) for s in outputs["input_sizes"]]
        own = outputs.get("pred_masks_sizes")
        padded = tuple(max(s[d] for s in input_sizes) for d in (0, 1))
        results = []
        for i, ((h, w), original) in enumerate(zip(input_sizes, torch.as_tensor(target_sizes).tolist())):
            if own is None:
                region, size = logits[i:i + 1], padded
            else:
                rows, cols = (int(v) for v in own[i])
                region, size = logits[i:i + 1, :, :rows, :cols], (h, w)
            upsampled = F.interpolate(region, size=size, mode="bilinear", align_corners=False)
            masks = (upsampled.sigmoid() > self.threshold)[0, :, :h, :w]
            masks = F.interpolate(masks[:, None].float(), size=tuple(int(v) for v in original), mode="nearest")
            results.append(masks[:, 0].bool())
        return results


class PostProcess(nn.Module):
    """Scores, labels and absolute ``(x1, y1, x2, y2)`` boxes for every query of every image, and
    the masks of a segmentation model's outputs (those with ``pred_masks``, see :class:`PostProcessSegm`).

    The score of a query is its highest softmax probability among the real classes ("no object"
    is excluded from the max but still takes part in the softmax), its label that class.
    """

    def __init__(self, mask_threshold: float = 0.5):
        super().__init__()
        self.segm = PostProcessSegm(mask_threshold)

    @torch.no_grad()
    def forward(self, outputs: Dict[str, Tensor], target_sizes: Tensor) -> List[Dict[str, Tensor]]:
        """
        Args:
            outputs: ``pred_logits`` ``(B, Q, K+1)`` and ``pred_boxes`` ``(B, Q, 4)`` normalised cxcywh;
                a segmentation model's ``pred_masks`` and ``input_sizes`` too.
            target_sizes: ``(B, 2)`` each image's original ``(height, width)`` in pixels.

        Returns:
            Per image ``{"scores": (Q,), "labels": (Q,) int64, "boxes": (Q, 4)}`` in pixels, plus
            ``"masks": (Q, height, width)`` bool when the outputs have ``pred_masks``.
        """
        logits, boxes = outputs["pred_logits"].float(), outputs["pred_boxes"].float()
        target_sizes = torch.as_tensor(target_sizes, device=logits.device)
        if target_sizes.shape != (logits.shape[0], 2):
            raise ValueError(f"target_sizes must be (B, 2) = ({logits.shape[0]}, 2) rows of (height, width), "
                             f"got shape {tuple(target_sizes.shape)}")
        scores, labels = logits.softmax(-1)[..., :-1].max(-1)
        h, w = target_sizes.float().unbind(1)
        scale = torch.stack([w, h, w, h], dim=1)[:, None, :]
        boxes = cxcywh_to_xyxy(boxes) * scale
        results = [{"scores": s, "labels": l, "boxes": b} for s, l, b in zip(scores, labels, boxes)]
        if "pred_masks" in outputs:
            for result, masks in zip(results, self.segm(outputs, target_sizes)):
                result["masks"] = masks
        return results


class PostProcessPanoptic(nn.Module):
    """A panoptic segmentation (PNG of segment ids and ``segments_info``) per image, with the
    semantics of official DETR's ``PostProcessPanoptic``:

    1. queries whose most likely class (the softmax over every class, "no object" included) is a
       real class with probability above ``threshold`` are kept;
    2. their mask logits are upsampled (bilinear) to the model's input size and each pixel goes to
       the kept query of highest logit (segment id = the query's rank among those kept, from 0);
    3. queries of one stuff class are merged: the first of them takes the pixels of the others;
    4. the map is resized (nearest) to the original size; while any segment has at most
       :data:`SMALL_SEGMENT` pixels, those segments (and the queries emptied by the merge) are
       removed and the map of step 2 recomputed among the queries left, at the original size.

    A class that ``is_thing_map`` does not list (a category id the data does not use) counts as a
    thing. One difference, for padded batches only: official DETR stretches the whole padded mask map
    over the image; here each image's own region is upsampled (as :class:`PostProcessSegm`), so an
    image's result does not depend on its batch. For an image alone both are the same.
    """

    def __init__(self, is_thing_map: Mapping[int, bool], threshold: float = 0.85):
        super().__init__()
        self.threshold = threshold
        self.is_thing_map = dict(is_thing_map)

    def _mask_logits(self, outputs: Dict[str, Tensor], index: int, size: tuple) -> Tensor:
        """Image ``index``'s ``(Q, height, width)`` mask logits at its input ``size``."""
        logits = outputs["pred_masks"][index:index + 1].float()
        own = outputs.get("pred_masks_sizes")
        if own is not None:
            rows, cols = (int(v) for v in own[index])
            return F.interpolate(logits[:, :, :rows, :cols], size=size, mode="bilinear", align_corners=False)[0]
        if "input_sizes" in outputs:
            sizes = [tuple(int(v) for v in s) for s in outputs["input_sizes"]]
            padded = tuple(max(s[d] for s in sizes) for d in (0, 1))
            full = F.interpolate(logits, size=padded, mode="bilinear", align_corners=False)[0]
            return full[:, :size[0], :size[1]]
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)[0]

    @torch.no_grad()
    def forward(self, outputs: Dict[str, Tensor], processed_sizes: Optional[Tensor] = None,
                target_sizes: Optional[Tensor] = None) -> List[dict]:
        """
        Args:
            outputs: ``pred_logits`` ``(B, Q, K+1)``, ``pred_masks`` ``(B, Q, h, w)`` mask logits, and
                ``input_sizes`` / ``pred_masks_sizes`` ``(B, 2)`` as the segmentation model gives them.
            processed_sizes: ``(B, 2)`` each image's ``(height, width)`` at the model's input (default:
                ``outputs["input_sizes"]``).
            target_sizes: ``(B, 2)`` each image's original ``(height, width)`` (default: ``processed_sizes``).

        Returns:
            Per image ``{"png_string": bytes, "segments_info": [{"id", "isthing", "category_id",
            "area"}], "ids": (height, width) int64}``: the PNG encodes ``ids`` as COCO panoptic does;
            segment ids start at 0 and every pixel belongs to a segment unless nothing was kept
            (then the map is all 0 and ``segments_info`` empty).
        """
        if processed_sizes is None:
            processed_sizes = outputs["input_sizes"]
        if target_sizes is None:
            target_sizes = processed_sizes
        logits = outputs["pred_logits"].float()
        if len(processed_sizes) != len(logits) or len(target_sizes) != len(logits):
            raise ValueError(f"processed_sizes and target_sizes need one (height, width) per image: {len(logits)}, "
                             f"got {len(processed_sizes)} and {len(target_sizes)}")
        results = []
        for i in range(len(logits)):
            size = tuple(int(v) for v in processed_sizes[i])
            final = tuple(int(v) for v in target_sizes[i])
            scores, labels = logits[i].softmax(-1).max(-1)
            keep = (labels != logits.shape[-1] - 1) & (scores > self.threshold)
            classes = labels[keep].tolist()
            masks = self._mask_logits(outputs, i, size)[keep].flatten(1)  # (N, h*w)
            results.append(self._segments(masks, classes, size, final))
        return results

    def _segments(self, masks: Tensor, classes: List[int], size: tuple, final: tuple) -> dict:
        """The panoptic map of the kept queries' ``(N, h*w)`` mask logits and ``classes``."""
        stuff: Dict[int, List[int]] = {}
        for k, label in enumerate(classes):
            if not self.is_thing_map.get(label, True):
                stuff.setdefault(label, []).append(k)
        ids = self._id_map(masks, size, final, merge=list(stuff.values()))
        while classes:
            area = np.bincount(ids.ravel(), minlength=len(classes))[:len(classes)]
            small = area <= SMALL_SEGMENT
            if not small.any():
                break
            kept = np.flatnonzero(~small)
            classes, masks = [classes[k] for k in kept], masks[torch.as_tensor(kept, dtype=torch.long)]
            ids = self._id_map(masks, size, final, merge=[])
        area = np.bincount(ids.ravel(), minlength=len(classes))[:len(classes)] if classes else []
        segments_info = [{"id": k, "isthing": bool(self.is_thing_map.get(c, True)), "category_id": int(c), "area": int(a)}
                         for k, (c, a) in enumerate(zip(classes, area))]
        with io.BytesIO() as buffer:
            Image.fromarray(id_to_rgb(ids)).save(buffer, format="PNG")
            png = buffer.getvalue()
        return {"png_string": png, "segments_info": segments_info, "ids": torch.from_numpy(ids)}

    @staticmethod
    def _id_map(masks: Tensor, size: tuple, final: tuple, merge: List[List[int]]) -> np.ndarray:
        """``(final height, final width)`` int64: per pixel the query of highest mask logit, each
        group of ``merge`` folded into its first query, resized (nearest, PIL's) to ``final``."""
        h, w = size
        if masks.shape[0] == 0:
            ids = torch.zeros(h * w, dtype=torch.long)
        else:
            ids = masks.argmax(0).cpu()
        for group in merge:
            for k in group[1:]:
                ids[ids == k] = group[0]
        picture = Image.fromarray(id_to_rgb(ids.view(h, w).numpy()))
        resized = picture.resize((final[1], final[0]), resample=Image.NEAREST)
        return rgb_to_id(np.asarray(resized))
