"""Every evaluation backend against pycocotools on a deliberately nasty set: all 12 stats and every
per-class AP identical (==), for boxes and masks, or the backend refused with the reason."""
import contextlib
import copy
import io
import json
import sys

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from detr_irpe.apps.cli import main
from detr_irpe.config import ConfigError, load_config
from detr_irpe.evaluation import (BACKENDS, METRIC_NAMES, NOT_EXACT, CocoEvaluator, evaluate_detections,
                                  resolve_backend)
from detr_irpe.evaluation.backends import FASTER_COCO_EVAL, load_ground_truth, run_cocoeval
from detr_irpe.errors import UsageError
from detr_irpe.optional import MissingExtraError
from helpers import load_benchmark

CATEGORIES = (1, 2, 3, 5, 7, 9)  # 9 has no ground truth at all
NO_GT_IMAGE, NO_DET_IMAGE, CROWDED_IMAGE = 3, 4, 2  # CROWDED_IMAGE: more than 100 detections


def _rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def _box_mask(image: dict, box) -> np.ndarray:
    x, y, w, h = (int(round(v)) for v in box)
    mask = np.zeros((image["height"], image["width"]), np.uint8)
    mask[y:y + h, x:x + w] = 1
    return mask


def nasty_set(seed: int = 0):
    """``(annotations, box results, mask results)``: crowd boxes and masks, an image without ground
    truth and one without detections, a category without ground truth, tied scores, boxes of area
    exactly 32**2 and 96**2, and one image with 130 detections."""
    rng = np.random.default_rng(seed)
    images = [{"id": i, "width": 200 + 10 * i, "height": 160 + 5 * i, "file_name": f"{i}.jpg"} for i in range(1, 13)]
    anns = []

    def add(image, category, box, crowd=0):
        x, y, w, h = box
        segmentation = (_rle(_box_mask(image, box)) if crowd else
                        [[x, y, x + w, y, x + w, y + h, x, y + h]])
        anns.append({"id": len(anns) + 1, "image_id": image["id"], "category_id": category, "bbox": [x, y, w, h],
                     "area": float(w * h), "iscrowd": crowd, "segmentation": segmentation})

    for image in images:
        if image["id"] == NO_GT_IMAGE:
            continue
        for _ in range(int(rng.integers(1, 7))):
            w, h = (float(v) for v in rng.integers(4, 120, 2))
            add(image, int(rng.choice(CATEGORIES[:-1])),
                (float(rng.integers(0, image["width"] - w)), float(rng.integers(0, image["height"] - h)), w, h))
    add(images[0], 1, (10.0, 10.0, 32.0, 32.0))  # area 32**2: the small / medium border
    add(images[0], 2, (50.0, 20.0, 96.0, 96.0))  # area 96**2: the medium / large border
    add(images[1], 1, (5.0, 5.0, 32.0, 32.0))
    add(images[4], 2, (0.0, 0.0, 150.0, 140.0), crowd=1)
    add(images[5], 3, (20.0, 20.0, 100.0, 100.0), crowd=1)
    gt = {"images": images, "annotations": anns, "categories": [{"id": c, "name": f"cat{c}"} for c in CATEGORIES]}

    boxes = []
    for image in images:
        if image["id"] == NO_DET_IMAGE:
            continue
        truth = [a for a in anns if a["image_id"] == image["id"]]
        for _ in range(130 if image["id"] == CROWDED_IMAGE else int(rng.integers(3, 40))):
            if truth and rng.random() < 0.5:  # near an object, mostly of its category
                target = truth[int(rng.integers(len(truth)))]
                x, y, w, h = target["bbox"]
                j = rng.normal(0, 3, 4)
                box = [max(0.0, x + j[0]), max(0.0, y + j[1]), max(1.0, w + j[2]), max(1.0, h + j[3])]
                category = target["category_id"] if rng.random() < 0.8 else int(rng.choice(CATEGORIES))
            else:
                w, h = (float(v) for v in rng.integers(2, 100, 2))
                box = [float(rng.integers(0, image["width"] - w)), float(rng.integers(0, image["height"] - h)), w, h]
                category = int(rng.choice(CATEGORIES))
            boxes.append({"image_id": image["id"], "category_id": category, "bbox": [float(v) for v in box],
                          "score": float(np.round(rng.random(), 1))})  # one decimal: many ties
    boxes.append({"image_id": 1, "category_id": 1, "bbox": [10.0, 10.0, 32.0, 32.0], "score": 0.5})
    boxes.append({"image_id": 1, "category_id": 2, "bbox": [50.0, 20.0, 96.0, 96.0], "score": 0.5})
    masks = [{"image_id": b["image_id"], "category_id": b["category_id"], "score": b["score"],
              "segmentation": _rle(_box_mask(images[b["image_id"] - 1], b["bbox"]))} for b in boxes]
    return gt, boxes, masks


@pytest.fixture(scope="module")
def nasty():
    gt, boxes, masks = nasty_set()
    # the set is as nasty as it says
    assert sum(a["iscrowd"] for a in gt["annotations"]) == 2
    assert NO_GT_IMAGE not in {a["image_id"] for a in gt["annotations"]}
    assert NO_DET_IMAGE not in {b["image_id"] for b in boxes}
    assert 9 not in {a["category_id"] for a in gt["annotations"]} and 9 in {b["category_id"] for b in boxes}
    assert sum(b["image_id"] == CROWDED_IMAGE for b in boxes) > 100
    assert {1024.0, 9216.0} <= {a["area"] for a in gt["annotations"]}
    assert len({b["score"] for b in boxes}) < len(boxes) / 10
    return gt, boxes, masks


def reference(gt: dict, results: list, iou_type: str):
    """pycocotools, called directly: ``(stats, per-class AP, the COCOeval)``."""
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = copy.deepcopy(gt)
        coco.createIndex()
        ev = COCOeval(coco, coco.loadRes(copy.deepcopy(results)), iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    per_class = {}
    for k, cat in enumerate(ev.params.catIds):
        p = ev.eval["precision"][:, :, k, 0, -1]
        if (p > -1).any():
            per_class[f"cat{cat}"] = float(np.mean(p[p > -1]))
    return [float(v) for v in ev.stats], per_class, ev


EXACT = [name for name in BACKENDS if name not in NOT_EXACT]


def test_the_fast_libraries_are_installed_so_the_parity_tests_cover_them():
    assert all(backend.installed for backend in BACKENDS.values())  # requirements.txt installs [fast-eval]


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
@pytest.mark.parametrize("backend", EXACT + ["auto"])
def test_every_backend_gives_pycocotools_numbers_bit_for_bit(nasty, backend, iou_type):
    gt, boxes, masks = nasty
    results = boxes if iou_type == "bbox" else masks
    stats, per_class, ev = reference(gt, results, iou_type)
    prefix = "segm_" if iou_type == "segm" else ""
    before = copy.deepcopy((gt, results))
    metrics = evaluate_detections(gt, results, backend=backend, iou_type=iou_type)
    assert (gt, results) == before  # the caller's data is left as it was
    assert [metrics[prefix + n] for n in METRIC_NAMES] == stats
    assert metrics[prefix + "per_class_AP"] == per_class
    assert set(per_class) == {f"cat{c}" for c in CATEGORIES[:-1]}  # no AP for the category without ground truth
    assert metrics["backend"] == ("ultrafast" if backend == "auto" else backend)

    evaluator = CocoEvaluator(gt, backend=backend)  # the arrays behind the pictures, too
    evaluator.add_results(results, iou_type)
    evaluator.summarize(verbose=False, iou_types=(iou_type,))
    for key in ("precision", "recall", "scores"):
        assert np.array_equal(evaluator.coco_evals[iou_type].eval[key], ev.eval[key]), key


def test_the_refused_backend_is_refused_because_it_still_differs(nasty):
    gt, boxes, _ = nasty
    with pytest.raises(UsageError, match="eval.backend=faster-coco-eval is refused: .*tp \\+ fp \\+ 2\\*\\*-52"):
        resolve_backend("faster-coco-eval")
    with pytest.raises(UsageError, match="refused"):
        evaluate_detections(gt, boxes, backend="faster-coco-eval")
    # the library itself, unrefused: if a release matches pycocotools, this fails, and the refusal can go
    stats, _, ev = reference(gt, boxes, "bbox")
    fast = run_cocoeval(FASTER_COCO_EVAL, load_ground_truth(FASTER_COCO_EVAL, gt), boxes, "bbox",
                        sorted(i["id"] for i in gt["images"]))
    differ = fast.eval["precision"] != ev.eval["precision"]
    assert differ.any()
    assert set(fast.eval["precision"][differ].tolist()) == {1.0}  # the reason NOT_EXACT gives
    assert set(ev.eval["precision"][differ].tolist()) == {1.0 / (1.0 + np.spacing(1.0))}


def test_auto_falls_back_to_pycocotools_without_the_extra_and_a_named_missing_one_says_what_to_install(
        monkeypatch, nasty):
    monkeypatch.setitem(sys.modules, "ultrafast_pycocotools", None)  # as if not installed
    assert resolve_backend("auto").name == "pycocotools"
    gt, boxes, _ = nasty
    assert evaluate_detections(gt, boxes)["backend"] == "pycocotools"
    with pytest.raises(MissingExtraError, match=r'eval.backend=ultrafast needs ultrafast-pycocotools.*'
                                                r'pip install "detr_irpe\[fast-eval\]"'):
        resolve_backend("ultrafast")


def test_images_updated_on_two_processes_merge_to_the_same_numbers(nasty):
    gt, boxes, _ = nasty
    whole = evaluate_detections(gt, boxes)
    ids = sorted(i["id"] for i in gt["images"])
    shards = []
    for part in (ids[0::2], ids[1::2]):  # each process's evaluator, as under DDP
        evaluator = CocoEvaluator(gt)
        evaluator.add_results([b for b in boxes if b["image_id"] in part], "bbox", image_ids=part)
        shards.append(evaluator.detections)
    merged = CocoEvaluator(gt)
    for shard in shards:  # what synchronize() does with all_gather_object's list
        merged.detections.update(shard)
    assert merged.summarize(verbose=False) == whole


def test_bad_results_and_annotations_are_named(tmp_path, nasty):
    gt, boxes, _ = nasty
    with pytest.raises(UsageError, match="image id 999 is not in the ground-truth"):
        evaluate_detections(gt, [{**boxes[0], "image_id": 999}])
    with pytest.raises(UsageError, match="result 1 has no bbox"):
        evaluate_detections(gt, [boxes[0], {k: v for k, v in boxes[1].items() if k != "bbox"}])
    with pytest.raises(UsageError, match="no annotations, categories"):
        evaluate_detections({"images": []}, boxes)
    with pytest.raises(FileNotFoundError, match="results file not found"):
        evaluate_detections(gt, tmp_path / "nothere.json")
    with pytest.raises(UsageError, match="iou_type must be bbox or segm"):
        evaluate_detections(gt, boxes, iou_type="keypoints")


def test_the_config_names_a_bad_backend_and_an_unknown_eval_key():
    assert load_config(None, ["eval.backend=pycocotools"]).eval.backend == "pycocotools"
    with pytest.raises(ConfigError, match="eval.backend must be one of auto, pycocotools, faster-coco-eval, "
                                          "ultrafast, got 'ultrafst'. Did you mean 'ultrafast'"):
        load_config(None, ["eval.backend=ultrafst"])
    with pytest.raises(ConfigError, match="unknown config key 'eval.backend_name'.*Did you mean 'backend'"):
        load_config(None, ["eval.backend_name=auto"])


def test_eval_cli_scores_a_results_file_without_a_model(tmp_path, nasty, capsys):
    gt, boxes, masks = nasty
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "dets.json").write_text(json.dumps(boxes))
    (tmp_path / "masks.json").write_text(json.dumps(masks))
    argv = ["eval", "--results", str(tmp_path / "dets.json"), "--annotations", str(tmp_path / "gt.json"),
            "--no-pictures"]
    assert main(argv + ["--backend", "pycocotools"]) == 0  # default folder: eval_dets beside the results
    printed = capsys.readouterr().out
    assert "COCO evaluation: pycocotools" in printed and "Average Precision" in printed
    saved = json.loads((tmp_path / "eval_dets" / "metrics.json").read_text())
    assert saved == evaluate_detections(gt, boxes, backend="pycocotools")
    assert main(argv) == 0  # auto, into a new numbered folder
    auto = json.loads((tmp_path / "eval_dets-2" / "metrics.json").read_text())
    assert auto == {**saved, "backend": "ultrafast"}
    assert main(["eval", "--results", str(tmp_path / "masks.json"), "--annotations", str(tmp_path / "gt.json"),
                 "--no-pictures", "--output-dir", str(tmp_path / "m")]) == 0  # segm, from the results
    assert json.loads((tmp_path / "m" / "metrics.json").read_text()) == evaluate_detections(gt, masks,
                                                                                            iou_type="segm")
    capsys.readouterr()
    assert main(argv + ["--output-dir", str(tmp_path / "eval_dets")]) == 1  # never over an earlier evaluation
    assert "--overwrite" in capsys.readouterr().err
    assert main(["eval", "--results", str(tmp_path / "dets.json")]) == 1
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "--results and --annotations" in err


def test_the_speed_benchmark_runs_and_finds_the_exact_backends_exact(capsys):
    rows = load_benchmark("eval_speed").main(["--images", "20", "--repeats", "1", "--skip-demo"])
    assert set(rows) == set(BACKENDS) and all(row[1] > 0 for row in rows.values())
    assert all(rows[name][2:] == rows["pycocotools"][2:] for name in EXACT)
    assert "speed-up" in capsys.readouterr().out
