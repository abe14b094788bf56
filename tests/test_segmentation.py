"""Instance segmentation (DETR's mask head, ``model.masks``): the head and its official layout, the
mask losses, the post-processing, mask AP, masks in the data, two-stage training with a frozen
detector, and a run through tools/train.py. References are written here, independently."""
import argparse
import contextlib
import copy
import io
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.cocoeval import COCOeval
from torchvision.ops import box_convert

from detr_irpe.config import ConfigError, DataConfig, load_config
from detr_irpe.data import AnnotationError, CocoDetection, load_coco, make_train_transforms, validate_coco_dict
from detr_irpe.data.check import check_dataset, format_report
from detr_irpe.engine.checkpoint import load_for_finetuning, load_frozen_weights
from detr_irpe.engine.inference import load_detector
from detr_irpe.engine.step import train_step
from detr_irpe.engine.train import Trainer, TrainingStopped
from detr_irpe.evaluation import METRIC_NAMES, CocoEvaluator
from detr_irpe.models import DETRsegm, PostProcess, build_backbone, build_detr
from detr_irpe.models.matcher import HungarianMatcher
from helpers import COCO, TINY, tiny_overrides, tool
from test_faults import sigterm_after
from test_models import official_detr_r50_shapes

# the tiny model with a mask head: hidden_dim 128 with 8 heads gives every group norm DETR's 8 groups
SEG = {**TINY, "hidden_dim": 128, "nheads": 8, "masks": True}
SEG_OVERRIDES = {"model.masks": "true", "model.hidden_dim": 128, "model.nheads": 8}
RPE = "rpe-2.0-product-ctx-1-k"
VAL_JSON = COCO / "annotations" / "instances_val2017.json"


def seg_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return build_detr(**{**SEG, **overrides})


# -- the head --------------------------------------------------------------------------------


def test_masks_come_at_stride_4_for_the_last_decoder_layer_only():
    model, _, _ = seg_model(rpe=RPE)
    out = model([torch.randn(3, 96, 128), torch.randn(3, 64, 70)])
    assert out["pred_logits"].shape == (2, 5, 5) and out["pred_boxes"].shape == (2, 5, 4)
    assert out["pred_masks"].shape == (2, 5, 24, 32)  # H / 4, W / 4 of the padded batch
    assert out["input_sizes"].tolist() == [[96, 128], [64, 70]]
    assert len(out["aux_outputs"]) == 1 and set(out["aux_outputs"][0]) == {"pred_logits", "pred_boxes"}
    # the wrapper reads as a DETR
    assert (model.num_classes, model.num_queries, model.backbone.stride) == (4, 5, 16)
    assert model.class_embed is model.detr.class_embed and model.backbone is model.detr.backbone


@pytest.mark.parametrize("name,channels", [("resnet18", (64, 128, 256)), ("tiny", (32, 64, 128))])
def test_backbones_give_their_stride_4_8_16_features(name, channels):
    backbone = build_backbone(name, "none").eval()
    images, mask = torch.randn(2, 3, 64, 96), torch.zeros(2, 64, 96, dtype=torch.bool)
    mask[1, 40:] = True
    levels = backbone.levels(images, mask, interm=True)
    assert backbone.interm_channels == channels
    assert [tuple(f.shape[1:]) for f, _ in levels[:3]] == [(c, 64 // s, 96 // s) for c, s in zip(channels, (4, 8, 16))]
    features, feature_mask = backbone(images, mask)
    assert torch.equal(levels[-1][0], features) and torch.equal(levels[-1][1], feature_mask)
    assert all(m.shape == (2, *f.shape[-2:]) and not m[0].any() and m[1].any() for f, m in levels[:3])


def naive_attention_map(module, queries, memory, mask):
    """DETR's MHAttentionMap, step by step: per-pixel key projection, scaled dot products per head,
    -inf on padding, one softmax over heads and positions together."""
    b, c, h, w = memory.shape
    heads = module.num_heads
    q = queries @ module.q_linear.weight.T + module.q_linear.bias  # (B, Q, C)
    k = memory.permute(0, 2, 3, 1) @ module.k_linear.weight.T + module.k_linear.bias  # (B, h, w, C)
    d = c // heads
    out = torch.empty(b, q.shape[1], heads, h, w, dtype=q.dtype)
    for n in range(heads):
        out[:, :, n] = torch.einsum("bqc,byxc->bqyx", q[..., n * d:(n + 1) * d], k[..., n * d:(n + 1) * d]) / d ** 0.5
    out = out.masked_fill(mask[:, None, None], float("-inf"))
    return out.flatten(2).softmax(-1).view(out.shape)


def naive_mask_head(head, features, attention, fpns):
    """DETR's MaskHeadSmallConv with each query's input built by explicit copies."""
    b, q = attention.shape[:2]
    x = torch.stack([torch.cat([features[i], attention[i, j]]) for i in range(b) for j in range(q)])
    x = F.relu(F.group_norm(F.conv2d(x, head.lay1.weight, head.lay1.bias, padding=1), 8, head.gn1.weight, head.gn1.bias))
    x = F.relu(F.group_norm(F.conv2d(x, head.lay2.weight, head.lay2.bias, padding=1), 8, head.gn2.weight, head.gn2.bias))
    for adapter, lay, gn, fpn in ((head.adapter1, head.lay3, head.gn3, fpns[0]), (head.adapter2, head.lay4, head.gn4, fpns[1]),
                                  (head.adapter3, head.lay5, head.gn5, fpns[2])):
        lateral = F.conv2d(fpn, adapter.weight, adapter.bias)
        lateral = torch.stack([lateral[i] for i in range(b) for _ in range(q)])
        x = lateral + F.interpolate(x, size=lateral.shape[-2:], mode="nearest")
        x = F.relu(F.group_norm(F.conv2d(x, lay.weight, lay.bias, padding=1), 8, gn.weight, gn.bias))
    return F.conv2d(x, head.out_lay.weight, head.out_lay.bias, padding=1).view(b, q, *x.shape[-2:])


def test_head_computes_what_detr_computes():
    model, _, _ = seg_model(rpe=RPE)
    model.eval().double()
    images, mask = torch.randn(2, 3, 80, 112, dtype=torch.float64), torch.zeros(2, 80, 112, dtype=torch.bool)
    mask[1, 60:], mask[1, :, 90:] = True, True
    with torch.no_grad():
        out = model(images, mask)
        run = model.detr.run(images, mask, interm=True)
        attention = naive_attention_map(model.bbox_attention, run.hs[-1], run.memory, run.mask)
        torch.testing.assert_close(model.bbox_attention(run.hs[-1], run.memory, run.mask), attention, rtol=0, atol=1e-12)
        fpns = [run.levels[2][0], run.levels[1][0], run.levels[0][0]]
        want = naive_mask_head(model.mask_head, run.projected, attention, fpns)
    torch.testing.assert_close(out["pred_masks"], want, rtol=0, atol=1e-10)
    assert torch.equal(run.hs[-1], model.detr.run(images, mask).hs[-1])  # the detector is unchanged by the head


def test_masks_do_not_depend_on_the_batch_with_the_per_image_backbone():
    model, _, post = seg_model(rpe=RPE)
    model.eval()
    torch.manual_seed(3)
    images = [torch.randn(3, 96, 128), torch.randn(3, 70, 90), torch.randn(3, 128, 64), torch.randn(3, 50, 150)]
    with torch.no_grad():
        batch = model(images, batched_backbone=False)
        sizes = torch.tensor([[200, 260], [150, 190], [250, 130], [100, 300]])
        batch_masks = post(batch, sizes)
        for i, image in enumerate(images):
            alone = model([image], batched_backbone=False)
            assert torch.equal(alone["pred_masks"], model([image])["pred_masks"])  # alone, it is DETR's computation
            rows, cols = batch["pred_masks_sizes"][i].tolist()
            assert alone["pred_masks"].shape[-2:] == (rows, cols)
            torch.testing.assert_close(batch["pred_masks"][i, :, :rows, :cols], alone["pred_masks"][0],
                                       rtol=0, atol=1e-5)
            assert batch["pred_masks"][i, :, rows:].abs().sum() == 0 and batch["pred_masks"][i, :, :, cols:].abs().sum() == 0
            alone_masks = post(alone, sizes[i:i + 1])[0]["masks"]
            assert alone_masks.shape == (5, *sizes[i].tolist())
            assert (alone_masks != batch_masks[i]["masks"]).float().mean() < 1e-4
            # an image alone: the per-image post-processing is DETR's
            assert torch.equal(post({k: v for k, v in alone.items() if k != "pred_masks_sizes"}, sizes[i:i + 1])[0]["masks"],
                               alone_masks)


OFFICIAL_HEAD_R50 = {  # DETRsegm's head for hidden_dim 256, 8 heads, ResNet-50 (layer3, 2, 1: 1024, 512, 256 channels)
    "bbox_attention.q_linear.weight": (256, 256), "bbox_attention.q_linear.bias": (256,),
    "bbox_attention.k_linear.weight": (256, 256), "bbox_attention.k_linear.bias": (256,),
    "mask_head.lay1.weight": (264, 264, 3, 3), "mask_head.lay1.bias": (264,),
    "mask_head.gn1.weight": (264,), "mask_head.gn1.bias": (264,),
    "mask_head.lay2.weight": (128, 264, 3, 3), "mask_head.lay2.bias": (128,),
    "mask_head.gn2.weight": (128,), "mask_head.gn2.bias": (128,),
    "mask_head.lay3.weight": (64, 128, 3, 3), "mask_head.lay3.bias": (64,),
    "mask_head.gn3.weight": (64,), "mask_head.gn3.bias": (64,),
    "mask_head.lay4.weight": (32, 64, 3, 3), "mask_head.lay4.bias": (32,),
    "mask_head.gn4.weight": (32,), "mask_head.gn4.bias": (32,),
    "mask_head.lay5.weight": (16, 32, 3, 3), "mask_head.lay5.bias": (16,),
    "mask_head.gn5.weight": (16,), "mask_head.gn5.bias": (16,),
    "mask_head.out_lay.weight": (1, 16, 3, 3), "mask_head.out_lay.bias": (1,),
    "mask_head.adapter1.weight": (128, 1024, 1, 1), "mask_head.adapter1.bias": (128,),
    "mask_head.adapter2.weight": (64, 512, 1, 1), "mask_head.adapter2.bias": (64,),
    "mask_head.adapter3.weight": (32, 256, 1, 1), "mask_head.adapter3.bias": (32,),
}


def official_args(rpe=""):
    """The model fields of the Namespace official DETR / iRPE-DETR store with a segmentation run."""
    return argparse.Namespace(backbone="resnet50", dilation=False, position_embedding="sine", hidden_dim=256,
                              nheads=8, enc_layers=6, dec_layers=6, dim_feedforward=2048, dropout=0.1,
                              pre_norm=False, num_queries=100, enc_rpe2d=rpe, masks=True,
                              frozen_weights="/output/box_model/checkpoint.pth", mask_loss_coef=1, dice_loss_coef=1,
                              dataset_file="coco_panoptic", aux_loss=True, lr=1e-4, lr_drop=15)


@pytest.mark.parametrize("rpe,with_args", [(None, False), (RPE, True)])
def test_an_official_detrsegm_checkpoint_loads_strictly(tmp_path, rpe, with_args):
    model, _, _ = build_detr(backbone_weights="none", num_classes=250, num_queries=100, rpe=rpe, masks=True)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    expected = {f"detr.{k}": s for k, s in official_detr_r50_shapes(num_classes=250).items()}
    expected.update(OFFICIAL_HEAD_R50)
    if rpe:
        expected.update({f"detr.transformer.encoder.layers.{n}.self_attn.rpe_k.lookup_table_weight": (1, 32, 81)
                         for n in range(6)})
    assert got == expected
    with torch.no_grad():  # weights that differ from a fresh model's
        for p in model.parameters():
            p.add_(torch.rand_like(p))
    path = tmp_path / "detr-r50-panoptic.pth"
    torch.save({"model": model.state_dict(), "args": official_args(rpe or "")} if with_args else model.state_dict(), path)
    det = load_detector(str(path))
    assert det.config.model.masks and det.config.model.rpe == rpe
    assert (det.config.model.num_classes, det.config.model.num_queries) == (250, 100)
    assert isinstance(det.model, DETRsegm)
    theirs = det.model.state_dict()
    assert all(torch.equal(theirs[k], v) for k, v in model.state_dict().items())


def test_mask_config_problems_are_named():
    with pytest.raises(ConfigError, match="hidden_dim >= 16"):
        build_detr(**{**TINY, "hidden_dim": 8, "nheads": 2, "masks": True})  # 8 / 16 = 0 channels
    with pytest.raises(ConfigError, match="query_groups=1"):
        build_detr(**{**SEG, "query_groups": 2})
    with pytest.raises(ConfigError, match="set model.masks=true"):
        load_config(None, ["train.frozen_weights=x.pth"])
    with pytest.raises(ConfigError, match="set only one"):
        load_config(None, ["model.masks=true", "train.frozen_weights=x.pth", "train.pretrained=y.pth"])


# -- losses ------------------------------------------------------------------------------------


def naive_mask_losses(pred_masks, targets, indices, num_boxes):
    """DETR's mask losses written out: pad every target mask to the batch's largest, upsample each
    matched prediction, focal loss (alpha 0.25, gamma 2) and DICE by their formulas."""
    height = max(t["masks"].shape[1] for t in targets)
    width = max(t["masks"].shape[2] for t in targets)
    focal, dice = 0.0, 0.0
    for b, (rows, cols) in enumerate(indices):
        for r, c in zip(rows.tolist(), cols.tolist()):
            target = torch.zeros(height, width, dtype=torch.float64)
            m = targets[b]["masks"][c]
            target[:m.shape[0], :m.shape[1]] = m.double()
            logit = F.interpolate(pred_masks[b, r][None, None], size=(height, width), mode="bilinear",
                                  align_corners=False)[0, 0]
            p = logit.sigmoid()
            ce = -(target * torch.log(p) + (1 - target) * torch.log(1 - p))
            p_t = p * target + (1 - p) * (1 - target)
            alpha_t = 0.25 * target + 0.75 * (1 - target)
            focal = focal + (alpha_t * ce * (1 - p_t) ** 2).mean()
            dice = dice + 1 - (2 * (p * target).sum() + 1) / (p.sum() + target.sum() + 1)
    return focal / num_boxes, dice / num_boxes


def random_targets(sizes, counts, seed=0):
    g = torch.Generator().manual_seed(seed)
    targets = []
    for (h, w), n in zip(sizes, counts):
        xy = torch.rand(n, 2, generator=g) * 0.5 + 0.25
        wh = torch.rand(n, 2, generator=g) * 0.3 + 0.1
        targets.append({"labels": torch.randint(0, 4, (n,), generator=g), "boxes": torch.cat([xy, wh], 1),
                        "masks": (torch.rand(n, h, w, generator=g) > 0.6).to(torch.uint8)})
    return targets


def test_mask_losses_equal_a_naive_reference():
    _, criterion, _ = seg_model()
    g = torch.Generator().manual_seed(1)
    outputs = {"pred_logits": torch.randn(3, 5, 5, generator=g, dtype=torch.float64),
               "pred_boxes": torch.rand(3, 5, 4, generator=g, dtype=torch.float64) * 0.5 + 0.2,
               "pred_masks": torch.randn(3, 5, 9, 13, generator=g, dtype=torch.float64),
               "aux_outputs": [{"pred_logits": torch.randn(3, 5, 5, generator=g, dtype=torch.float64),
                                "pred_boxes": torch.rand(3, 5, 4, generator=g, dtype=torch.float64) * 0.5 + 0.2}]}
    targets = random_targets([(30, 50), (36, 41), (20, 52)], [2, 0, 3])
    losses = criterion(outputs, targets)
    indices = HungarianMatcher(1, 5, 2)({k: outputs[k] for k in ("pred_logits", "pred_boxes")}, targets)
    focal, dice = naive_mask_losses(outputs["pred_masks"], targets, indices, num_boxes=5)
    torch.testing.assert_close(losses["loss_mask"], focal, rtol=1e-12, atol=0)
    torch.testing.assert_close(losses["loss_dice"], dice, rtol=1e-12, atol=0)
    assert "loss_mask_0" not in losses and "loss_dice_0" not in losses  # no masks on the auxiliary layers
    assert criterion.weight_dict["loss_mask"] == criterion.weight_dict["loss_dice"] == 1.0
    assert "loss_mask_0" not in criterion.weight_dict


def test_a_training_step_trains_the_head_with_the_detector():
    model, criterion, _ = seg_model()
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    images, mask = torch.randn(2, 3, 96, 112), torch.zeros(2, 96, 112, dtype=torch.bool)
    mask[1, 80:] = True
    targets = random_targets([(96, 112), (80, 112)], [2, 1])
    before = copy.deepcopy(model.state_dict())
    result = train_step(model, criterion, optimizer, (images, mask, targets), clip_max_norm=0.1)
    assert {"loss_mask", "loss_dice"} <= set(result.losses) and np.isfinite(result.loss)
    after = model.state_dict()
    for key in ("mask_head.lay1.weight", "bbox_attention.q_linear.weight", "detr.class_embed.weight"):
        assert not torch.equal(before[key], after[key]), key
    with pytest.raises(ConfigError, match="targets have none"):
        criterion(model(images, mask), [{k: v for k, v in t.items() if k != "masks"} for t in targets])


# -- post-processing ---------------------------------------------------------------------------


def nearest_sources(n_in, n_out):
    """The source index of each output index of a nearest resize, as torch defines it (float32 scale)."""
    scale = torch.tensor(n_in, dtype=torch.float32) / n_out
    return (torch.arange(n_out, dtype=torch.float32) * scale).floor().long().clamp(max=n_in - 1)


def naive_postprocess(logits, input_sizes, original_sizes, own=None):
    """DETR's PostProcessSegm for a padded batch (``own`` None); with ``own`` each image's region alone."""
    out = []
    padded = (max(h for h, _ in input_sizes), max(w for _, w in input_sizes))
    for i, ((h, w), (oh, ow)) in enumerate(zip(input_sizes, original_sizes)):
        region, size = (logits[i], padded) if own is None else (logits[i, :, :own[i][0], :own[i][1]], (h, w))
        up = F.interpolate(region[None], size=size, mode="bilinear", align_corners=False)[0]
        binary = (torch.sigmoid(up) > 0.5)[:, :h, :w].float()
        rows = nearest_sources(h, oh)
        cols = nearest_sources(w, ow)
        out.append(binary[:, rows][:, :, cols].bool())
    return out


@pytest.mark.parametrize("per_image", [False, True])
def test_postprocess_equals_a_naive_reference(per_image):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 4, 20, 30, generator=g) * 3
    input_sizes, original = [(80, 120), (61, 97), (77, 33)], [(480, 640), (300, 500), (200, 91)]
    outputs = {"pred_logits": torch.randn(3, 4, 3, generator=g), "pred_boxes": torch.rand(3, 4, 4, generator=g),
               "pred_masks": logits, "input_sizes": torch.tensor(input_sizes)}
    own = None
    if per_image:
        own = [(20, 30), (16, 25), (20, 9)]
        outputs["pred_masks_sizes"] = torch.tensor(own)
    results = PostProcess()(outputs, torch.tensor(original))
    for result, want in zip(results, naive_postprocess(logits, input_sizes, original, own)):
        assert result["masks"].dtype == torch.bool and torch.equal(result["masks"], want)
        assert set(result) == {"scores", "labels", "boxes", "masks"}


# -- mask AP ------------------------------------------------------------------------------------


def predicted_masks(coco, seed=0):
    """The ground truth's masks, some dropped, some shifted or dilated, plus false positives, random scores."""
    rng = np.random.default_rng(seed)
    predictions = {}
    for image_id in sorted(coco.imgs):
        info = coco.imgs[image_id]
        anns = [a for a in coco.imgToAnns[image_id] if not a["iscrowd"] and rng.random() > 0.2]
        masks = [coco.annToMask(a) for a in anns]
        masks = [np.roll(m, int(rng.integers(-8, 9)), axis=int(rng.integers(0, 2))) for m in masks]
        labels = [a["category_id"] for a in anns]
        for _ in range(int(rng.integers(0, 3))):  # false positives
            m = np.zeros((info["height"], info["width"]), np.uint8)
            y, x = int(rng.integers(0, info["height"] - 40)), int(rng.integers(0, info["width"] - 40))
            m[y:y + 40, x:x + 40] = 1
            masks.append(m)
            labels.append(int(rng.choice(coco.getCatIds())))
        n = len(masks)
        boxes = torch.tensor(np.array([mask_utils.toBbox(mask_utils.encode(np.asfortranarray(m))) for m in masks]),
                             dtype=torch.float32).reshape(-1, 4)
        predictions[image_id] = {"scores": torch.tensor(rng.random(n)), "labels": torch.tensor(labels),
                                 "boxes": box_convert(boxes, "xywh", "xyxy"),
                                 "masks": torch.from_numpy(np.stack(masks)).bool() if n else
                                 torch.zeros(0, info["height"], info["width"], dtype=torch.bool)}
    return predictions


def test_mask_ap_equals_a_direct_pycocotools_run(tmp_path):
    coco = load_coco(VAL_JSON)
    predictions = predicted_masks(coco)
    evaluator = CocoEvaluator(coco)
    evaluator.update(predictions)
    evaluator.synchronize()
    metrics = evaluator.summarize(tmp_path, verbose=False)

    results = []
    for image_id, p in predictions.items():
        for m, s, c in zip(p["masks"].numpy(), p["scores"].tolist(), p["labels"].tolist()):
            rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
            rle["counts"] = rle["counts"].decode("ascii")
            results.append({"image_id": image_id, "category_id": c, "segmentation": rle, "score": s})
    with contextlib.redirect_stdout(io.StringIO()):
        direct = COCOeval(coco, coco.loadRes(results), "segm")
        direct.params.imgIds = sorted(predictions)
        direct.evaluate()
        direct.accumulate()
        direct.summarize()
    assert [metrics[f"segm_{n}"] for n in METRIC_NAMES] == [float(v) for v in direct.stats]
    assert 0.2 < metrics["segm_AP"] < 0.9 and metrics["segm_AP"] != metrics["AP"]
    names = {c["id"]: c["name"] for c in coco.dataset["categories"]}
    for k, cat_id in enumerate(direct.params.catIds):
        p = direct.eval["precision"][:, :, k, 0, -1]
        if (p > -1).any():
            assert metrics["segm_per_class_AP"][names[cat_id]] == float(np.mean(p[p > -1]))
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["segm_AP"] == metrics["segm_AP"] and set(METRIC_NAMES) <= set(saved)


# -- data --------------------------------------------------------------------------------------


def test_dataset_masks_are_pycocotools_masks_and_crowds_are_left_out():
    dataset = CocoDetection(COCO / "val2017", VAL_JSON, masks=True)
    coco = dataset.coco
    for index, image_id in enumerate(dataset.ids):
        _, target = dataset[index]
        anns = [a for a in coco.imgToAnns[image_id] if not a["iscrowd"]]  # every box of this subset is kept
        assert target["masks"].dtype == torch.uint8 and len(target["masks"]) == len(target["boxes"]) == len(anns)
        for mask, ann in zip(target["masks"], anns):
            assert np.array_equal(mask.numpy(), coco.annToMask(ann))
    assert "masks" not in CocoDetection(COCO / "val2017", VAL_JSON)[0][1]  # only when asked for


def write_rectangles(root, seed=0):
    """A small COCO dataset of rectangles: each polygon's mask covers exactly its box."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    images, annotations = [], []
    for image_id in range(1, 4):
        h, w = int(rng.integers(80, 120)), int(rng.integers(100, 160))
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / "images" / f"{image_id}.png")
        images.append({"id": image_id, "file_name": f"{image_id}.png", "height": h, "width": w})
        for _ in range(4):
            x0, y0 = int(rng.integers(0, w - 30)), int(rng.integers(0, h - 30))
            x1, y1 = x0 + int(rng.integers(12, 30)), y0 + int(rng.integers(12, 30))
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": 1, "iscrowd": 0,
                                "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0),
                                "segmentation": [[x0, y0, x1, y0, x1, y1, x0, y1]]})
    path = root / "annotations.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations,
                                "categories": [{"id": 1, "name": "box"}]}))
    return path


def test_masks_follow_their_boxes_through_flips_resizes_and_crops(tmp_path):
    annotations = write_rectangles(tmp_path)
    cfg = DataConfig(train_scales=[64, 96, 144], max_size=200, crop_resize=[90], crop_min=40, crop_max=70)
    dataset = CocoDetection(tmp_path / "images", annotations, make_train_transforms(cfg), masks=True)
    checked = 0
    for seed in range(12):
        torch.manual_seed(seed)
        for index in range(len(dataset)):
            image, target = dataset[index]
            h, w = image.shape[-2:]
            masks = target["masks"]
            assert masks.shape[1:] == (h, w) and len(masks) == len(target["boxes"])
            boxes = box_convert(target["boxes"] * torch.tensor([w, h, w, h]), "cxcywh", "xyxy")
            for box, mask in zip(boxes, masks):
                rows, cols = mask.any(1).nonzero().flatten(), mask.any(0).nonzero().flatten()
                if len(rows) == 0:  # a sliver the nearest resize left without pixels
                    assert min(box[2] - box[0], box[3] - box[1]) < 2
                    continue
                from_mask = torch.tensor([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1], dtype=torch.float32)
                # a source pixel's edge moves by up to the upscaling factor (at most 144 / 40)
                assert (from_mask - box).abs().max() <= 1.0 + 144 / 40, (seed, index, box, from_mask)
                checked += 1
    assert checked > 100


def test_malformed_segmentations_are_named_when_masks_are_asked_for(tmp_path):
    images = [{"id": 1, "file_name": "a.png", "height": 40, "width": 50}, {"id": 2, "file_name": "b.png"}]
    segmentations = [
        [[1, 1, 20, 1, 20, 20]],  # fine: a triangle
        [],  # no polygon
        [[1, 2, 3, 4]],  # 4 coordinates: pycocotools would read a box
        [[1, 2, 3, 4, 5]],  # odd
        "not a segmentation",
        {"counts": "abc", "size": [50, 40]},  # size is [height, width]
        {"counts": [10, 5], "size": [40, 50]},  # runs do not cover the image
        [[1, 1, 20, 1, 20, 20]],  # on image 2, which has no size to draw it in
    ]
    annotations = [{"id": i + 1, "image_id": 1 if i < 7 else 2, "category_id": 1, "bbox": [1, 1, 10, 10],
                    "segmentation": s} for i, s in enumerate(segmentations)]
    annotations.append({"id": 20, "image_id": 1, "category_id": 1, "bbox": [1, 1, 10, 10]})  # none at all
    data = {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "x"}]}
    assert not any(k.startswith("segmentation") for k in validate_coco_dict(data).findings)  # detection: unread
    report = validate_coco_dict(data, masks=True, max_examples=10)
    malformed = report.findings["segmentation_malformed"]
    assert malformed.count == 7 and report.findings["segmentation_missing"].count == 1
    text = malformed.describe(max_examples=10)
    for needle in ("annotation 2 (image 1) has an empty list of polygons", "a polygon of 4 coordinates",
                   "a polygon of 5 coordinates", "'not a segmentation'", "RLE of size [50, 40], but its image is 50x40",
                   "run lengths do not add up", "annotation 8 (image 2) has polygons, but its image has no valid width"):
        assert needle in text, needle
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    assert "segmentation_malformed" in check_dataset(path, None, masks=True).findings
    assert "annotation 20" in format_report(check_dataset(path, None, masks=True))
    (tmp_path / "images").mkdir()
    with pytest.raises(AnnotationError, match="neither polygons nor RLE"):
        CocoDetection(tmp_path / "images", path, masks=True)
    CocoDetection(tmp_path / "images", path)  # a detection dataset does not read them


# -- two-stage training ---------------------------------------------------------------------------


def detection_checkpoint(path):
    """Our checkpoint of a tiny detector of the size SEG_OVERRIDES gives (as a detection run would write)."""
    cfg = load_config(None, tiny_overrides(path.parent / "unused", **{"model.hidden_dim": 128, "model.nheads": 8}))
    torch.manual_seed(5)
    model, _, _ = build_detr(cfg.model)
    torch.save({"model": model.state_dict(), "config": cfg.to_dict()}, path)
    return model.state_dict()


def frozen_cfg(out, frozen, **extra):
    values = {**SEG_OVERRIDES, "train.frozen_weights": str(frozen), "train.epochs": 1, "train.eval_every": 0,
              "train.max_iters_per_epoch": 3, **extra}
    return load_config(None, tiny_overrides(out, **values))


def test_frozen_weights_train_the_mask_head_alone_and_resume_equals_a_straight_run(tmp_path):
    detector = detection_checkpoint(tmp_path / "boxes.pth")
    straight = Trainer(frozen_cfg(tmp_path / "straight", tmp_path / "boxes.pth"), quiet=True)
    trained = {id(p) for group in straight.optimizer.param_groups for p in group["params"]}
    head = {id(p) for n, p in straight.model.named_parameters() if n.startswith(("bbox_attention.", "mask_head."))}
    assert trained == head and len(straight.optimizer.param_groups) == 1
    start = copy.deepcopy(straight.model.state_dict())
    straight.fit()
    want = straight.model.state_dict()
    for key, value in detector.items():  # the detector, batch-norm statistics included, never moves
        assert torch.equal(want[f"detr.{key}"], value), key
    assert not torch.equal(want["mask_head.lay1.weight"], start["mask_head.lay1.weight"])

    interrupted = Trainer(frozen_cfg(tmp_path / "split", tmp_path / "boxes.pth"), quiet=True)
    handle = sigterm_after(interrupted.model, calls=2)  # stopped after iteration 1 of 3, mid-epoch
    with pytest.raises(TrainingStopped):
        interrupted.fit()
    handle.remove()
    (tmp_path / "boxes.pth").unlink()  # a resume reads the detector from its own checkpoint
    resumed = Trainer(frozen_cfg(tmp_path / "split", tmp_path / "boxes.pth"),
                      resume=str(tmp_path / "split" / "checkpoint.pth"), quiet=True)
    assert (resumed.epoch, resumed.step_in_epoch) == (0, 2)
    assert not any(p.requires_grad for p in resumed.model.detr.parameters())
    resumed.fit()
    got = resumed.model.state_dict()
    assert want.keys() == got.keys()
    for key in want:
        assert torch.equal(want[key], got[key]), f"{key} differs after resume"


def test_a_detection_checkpoint_starts_a_segmentation_model_and_back(tmp_path):
    detector, _, _ = build_detr(**{**SEG, "masks": False})
    model, _, _ = seg_model(seed=1)
    report = load_for_finetuning(model, detector.state_dict())
    assert set(report.initialised) == {k for k in model.state_dict() if not k.startswith("detr.")}
    assert all(torch.equal(model.detr.state_dict()[k], v) for k, v in detector.state_dict().items())
    back = load_for_finetuning(detector, model.state_dict())
    assert back.unexpected and all(k.startswith(("bbox_attention.", "mask_head.")) for k in back.unexpected)
    torch.save({"model": model.state_dict()}, tmp_path / "segm.pth")  # a segmentation model's detector
    fresh, _, _ = seg_model(seed=2)
    load_frozen_weights(fresh, str(tmp_path / "segm.pth"))
    assert all(torch.equal(fresh.detr.state_dict()[k], v) for k, v in model.detr.state_dict().items())
    assert not any(p.requires_grad for p in fresh.detr.parameters())
    assert all(p.requires_grad for p in fresh.mask_head.parameters())


# -- end to end ----------------------------------------------------------------------------------


def test_train_and_eval_with_masks_write_mask_ap(tmp_path):
    out = tmp_path / "run"
    assert tool("train").main(tiny_overrides(out, **SEG_OVERRIDES, **{
        "train.epochs": 1, "train.max_iters_per_epoch": 2, "train.deterministic": "false"})) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert {f"segm_{n}" for n in METRIC_NAMES} | set(METRIC_NAMES) <= set(metrics)
    assert isinstance(metrics["segm_per_class_AP"], dict) and metrics["segm_per_class_AP"]
    record = json.loads((out / "log.jsonl").read_text().splitlines()[-1])
    assert record["val_segm_AP"] == metrics["segm_AP"] and "train_loss_mask" in record and "train_loss_dice" in record

    ev = tmp_path / "eval"
    assert tool("eval").main(["--checkpoint", str(out / "checkpoint.pth"), "--output-dir", str(ev)]) == 0
    again = json.loads((ev / "metrics.json").read_text())
    assert {k: again[k] for k in metrics} == metrics  # the checkpoint evaluates as the run did
