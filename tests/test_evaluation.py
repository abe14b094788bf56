"""CocoEvaluator against pycocotools run directly, on the COCO subset in tests/data."""
import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools.cocoeval import COCOeval

from detr_irpe.data import load_coco
from detr_irpe.evaluation import METRIC_NAMES, CocoEvaluator

VAL_JSON = Path(__file__).parent / "data" / "coco" / "annotations" / "instances_val2017.json"


@pytest.fixture(scope="module")
def coco_gt():
    return load_coco(VAL_JSON)


def gt_predictions(coco, image_ids=None):
    """The non-crowd ground truth of each image as detections with score 1."""
    preds = {}
    for image_id in image_ids or sorted(coco.imgs):
        anns = [a for a in coco.imgToAnns[image_id] if not a["iscrowd"]]
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        preds[image_id] = {"boxes": boxes, "scores": torch.ones(len(anns)),
                           "labels": torch.tensor([a["category_id"] for a in anns])}
    return preds


def perturbed_predictions(coco, seed=0):
    rng = np.random.default_rng(seed)
    preds = {}
    cat_ids = coco.getCatIds()
    for image_id, pred in gt_predictions(coco).items():
        info = coco.imgs[image_id]
        boxes, labels = pred["boxes"].numpy(), pred["labels"].numpy()
        keep = rng.random(len(boxes)) > 0.2  # drop some
        boxes, labels = boxes[keep], labels[keep]
        wh = np.tile(boxes[:, 2:] - boxes[:, :2], 2)
        boxes = boxes + rng.normal(0, 0.08, boxes.shape) * wh  # jitter
        n_fp = int(rng.integers(0, 4))  # false positives, one with a category absent from the file
        xy = rng.uniform(0, [info["width"] / 2, info["height"] / 2], size=(n_fp, 2))
        fp = np.concatenate([xy, xy + rng.uniform(5, 150, size=(n_fp, 2))], axis=1)
        fp_labels = rng.choice(cat_ids + [12], size=n_fp)
        preds[image_id] = {"boxes": torch.tensor(np.concatenate([boxes, fp]), dtype=torch.float32),
                           "scores": torch.tensor(rng.random(len(boxes) + n_fp)),
                           "labels": torch.tensor(np.concatenate([labels, fp_labels]))}
    return preds


def direct_cocoeval(coco, preds):
    """pycocotools on its own: results written by hand (xywh), evaluated on the given images."""
    results = []
    for image_id, p in preds.items():
        for (x0, y0, x1, y1), s, c in zip(p["boxes"].tolist(), p["scores"].tolist(), p["labels"].tolist()):
            results.append({"image_id": image_id, "category_id": c, "bbox": [x0, y0, x1 - x0, y1 - y0], "score": s})
    with contextlib.redirect_stdout(io.StringIO()):
        ev = COCOeval(coco, coco.loadRes(results), "bbox")
        ev.params.imgIds = sorted(preds)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev


def test_ground_truth_scores_one(coco_gt, tmp_path):
    evaluator = CocoEvaluator(coco_gt)
    evaluator.update(gt_predictions(coco_gt))
    evaluator.synchronize()
    metrics = evaluator.summarize(tmp_path, verbose=False)
    for name in METRIC_NAMES:
        if name not in ("AR1", "AR10"):  # images with more objects than that cannot reach recall 1
            assert metrics[name] == pytest.approx(1.0), name
    assert metrics["per_class_AP"]["person"] == pytest.approx(1.0)
    assert all(v == pytest.approx(1.0) for v in metrics["per_class_AP"].values())


@pytest.mark.parametrize("seed", [0, 1])
def test_matches_pycocotools(coco_gt, seed):
    preds = perturbed_predictions(coco_gt, seed)
    evaluator = CocoEvaluator(coco_gt)
    for image_id in sorted(preds):  # one image per "batch"
        evaluator.update({image_id: preds[image_id]})
    metrics = evaluator.summarize(verbose=False)
    ev = direct_cocoeval(coco_gt, preds)
    assert [metrics[n] for n in METRIC_NAMES] == pytest.approx(ev.stats.tolist(), abs=1e-12)
    assert 0.05 < metrics["AP"] < 0.95
    # per-class AP by hand from the accumulated precision (all areas, 100 detections)
    person = coco_gt.getCatIds(catNms=["person"])[0]
    p = ev.eval["precision"][:, :, ev.params.catIds.index(person), 0, -1]
    assert metrics["per_class_AP"]["person"] == pytest.approx(p[p > -1].mean())


def test_only_updated_images_are_evaluated(coco_gt):
    preds = perturbed_predictions(coco_gt, 2)
    half = {k: preds[k] for k in sorted(preds)[:3]}
    evaluator = CocoEvaluator(coco_gt)
    evaluator.update(half)
    metrics = evaluator.summarize(verbose=False)
    assert [metrics[n] for n in METRIC_NAMES] == pytest.approx(direct_cocoeval(coco_gt, half).stats.tolist())


def test_files_and_table(coco_gt, tmp_path, capsys):
    preds = perturbed_predictions(coco_gt, 3)
    evaluator = CocoEvaluator(coco_gt)
    evaluator.update(preds)
    metrics = evaluator.summarize(tmp_path / "out")
    printed = capsys.readouterr().out
    assert "Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ]" in printed
    assert "per-class AP" in printed and "person" in printed
    detections = json.loads((tmp_path / "out" / "detections.json").read_text())
    assert len(detections) == sum(len(p["scores"]) for p in preds.values())
    first_id = sorted(preds)[0]
    x0, y0, x1, y1 = preds[first_id]["boxes"][0].tolist()
    assert detections[0]["image_id"] == first_id
    assert detections[0]["bbox"] == pytest.approx([x0, y0, x1 - x0, y1 - y0])
    assert set(detections[0]) == {"image_id", "category_id", "bbox", "score"}
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert set(saved) == set(METRIC_NAMES) | {"per_class_AP", "backend"}
    assert {n: saved[n] for n in METRIC_NAMES} == pytest.approx({n: metrics[n] for n in METRIC_NAMES})
    assert saved["per_class_AP"] == pytest.approx(metrics["per_class_AP"])
    evaluator.write(tmp_path / "again")  # the engine's spelling: summarize(), then write()
    for name in ("detections.json", "metrics.json"):
        assert (tmp_path / "again" / name).read_bytes() == (tmp_path / "out" / name).read_bytes()


def test_zero_detections(coco_gt, tmp_path, capsys):
    evaluator = CocoEvaluator(coco_gt)
    empty = {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64)}
    evaluator.update({image_id: empty for image_id in coco_gt.imgs})
    evaluator.synchronize()
    metrics = evaluator.summarize(tmp_path)
    assert "no detections" in capsys.readouterr().out
    assert all(metrics[n] == 0.0 for n in METRIC_NAMES)
    assert metrics["per_class_AP"] and set(metrics["per_class_AP"].values()) == {0.0}
    assert json.loads((tmp_path / "detections.json").read_text()) == []
    assert CocoEvaluator(coco_gt).summarize(verbose=False)["AP"] == 0.0  # nothing updated at all


def test_rejects_unknown_image_and_mismatched_lengths(coco_gt):
    evaluator = CocoEvaluator(coco_gt)
    with pytest.raises(ValueError, match="image id 123"):
        evaluator.update({123: {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0)}})
    image_id = next(iter(coco_gt.imgs))
    with pytest.raises(ValueError, match="2 boxes, 1 scores"):
        evaluator.update({image_id: {"boxes": torch.zeros(2, 4), "scores": torch.zeros(1), "labels": torch.zeros(2)}})


