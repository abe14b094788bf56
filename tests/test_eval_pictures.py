"""The pictures that explain the AP: their numbers are pycocotools' own arrays (PR curves, sizes)
and a naive count (the confusion matrix); they are drawn with labelled axes, readable with 80
classes, written by eval and at each validation in training, and redrawn by visualize."""
import json

import numpy as np
import pytest
from matplotlib.colors import to_hex
from test_eval_backends import nasty, reference  # noqa: F401 (nasty: the fixture, shared)

from detr_irpe.apps.cli import main
from detr_irpe.evaluation import CocoEvaluator
from detr_irpe.visualize import eval_plots
from helpers import tiny_overrides


def box_iou(dt, gt, crowd):
    """COCO's IoU of two xywh boxes; for a crowd region the overlap over the detection's area."""
    x0, y0 = max(dt[0], gt[0]), max(dt[1], gt[1])
    x1, y1 = min(dt[0] + dt[2], gt[0] + gt[2]), min(dt[1] + dt[3], gt[1] + gt[3])
    inter = max(0.0, x1 - x0) * max(0.0, y1 - y0)
    union = dt[2] * dt[3] if crowd else dt[2] * dt[3] + gt[2] * gt[3] - inter
    return inter / union


def naive_confusion(gt, results, threshold, iou=0.5):
    """Greedy, class-agnostic, by score (ties in result order): each detection takes the unmatched
    non-crowd object it overlaps most (the later one on a tie), else a crowd region (then counts
    nowhere), else it is background; objects left unmatched are missed."""
    cats = sorted(c["id"] for c in gt["categories"])
    index, bg = {c: k for k, c in enumerate(cats)}, len(cats)
    matrix = np.zeros((bg + 1, bg + 1), dtype=np.int64)
    for image in gt["images"]:
        objects = [a for a in gt["annotations"] if a["image_id"] == image["id"]]
        objects = [a for a in objects if not a["iscrowd"]] + [a for a in objects if a["iscrowd"]]
        dets = sorted((r for r in results if r["image_id"] == image["id"] and r["score"] >= threshold),
                      key=lambda r: -r["score"])
        taken = set()
        for det in dets:
            best, match = min(iou, 1 - 1e-10), None
            for g, obj in enumerate(objects):
                if g in taken and not obj["iscrowd"]:
                    continue
                if match is not None and not objects[match]["iscrowd"] and obj["iscrowd"]:
                    break
                overlap = box_iou(det["bbox"], obj["bbox"], obj["iscrowd"])
                if overlap >= best:
                    best, match = overlap, g
            if match is None:
                matrix[bg, index[det["category_id"]]] += 1
            elif not objects[match]["iscrowd"]:
                taken.add(match)
                matrix[index[objects[match]["category_id"]], index[det["category_id"]]] += 1
        for g, obj in enumerate(objects):
            if not obj["iscrowd"] and g not in taken:
                matrix[index[obj["category_id"]], bg] += 1
    return matrix


def evaluated(gt, results, backend="auto", iou_type="bbox"):
    evaluator = CocoEvaluator(gt, backend=backend)
    evaluator.add_results(results, iou_type)
    evaluator.summarize(verbose=False, iou_types=(iou_type,))
    return evaluator


@pytest.mark.parametrize("backend", ["pycocotools", "ultrafast"])
def test_confusion_matrix_equals_a_naive_count(nasty, backend):
    gt, boxes, _ = nasty
    evaluator = evaluated(gt, boxes, backend)
    for threshold in (0.0, 0.5, 0.85):
        analysis = evaluator.analysis(threshold)["bbox"]["confusion"]
        assert analysis["threshold"] == threshold and analysis["labels"][-1] == "background"
        assert np.array_equal(np.array(analysis["matrix"]), naive_confusion(gt, boxes, threshold)), threshold
    assert evaluator.analysis(1.5)["bbox"]["confusion"]["matrix"] == naive_confusion(gt, boxes, 1.5).tolist()


def test_pr_curves_and_sizes_are_pycocotools_arrays(nasty):
    gt, boxes, masks = nasty
    for iou_type, results in (("bbox", boxes), ("segm", masks)):
        stats, per_class, ev = reference(gt, results, iou_type)
        analysis = evaluated(gt, results, iou_type=iou_type).analysis()[iou_type]
        assert analysis["recall_thresholds"] == ev.params.recThrs.tolist()
        for t, iou in ((0, "0.5"), (5, "0.75")):
            for k, cat in enumerate(ev.params.catIds):
                curve = ev.eval["precision"][t, :, k, 0, -1]
                expected = None if (curve == -1).all() else curve.tolist()
                assert analysis["pr_curves"][iou][f"cat{cat}"] == expected
        assert analysis["pr_curves"]["0.5"]["cat9"] is None  # no ground truth
        sizes = analysis["sizes"]
        assert [sizes[a]["AP"] for a in ("all", "small", "medium", "large")] == [stats[0]] + stats[3:6]
        assert [sizes[a]["AR"] for a in ("all", "small", "medium", "large")] == [stats[8]] + stats[9:12]
        assert (sizes["all"]["AP50"], sizes["all"]["AP75"]) == (stats[1], stats[2])
        assert analysis["per_class_AP"] == per_class


def eighty_classes():
    """A small set with 80 categories, each with objects, and detections of every category."""
    rng = np.random.default_rng(3)
    images = [{"id": i, "width": 320, "height": 240} for i in range(1, 41)]
    anns, dets = [], []
    for n in range(320):
        image, cat = images[n % 40]["id"], 1 + n % 80
        x, y, w, h = (float(v) for v in (*rng.integers(0, 200, 2), *rng.integers(8, 100, 2)))
        anns.append({"id": n + 1, "image_id": image, "category_id": cat, "bbox": [x, y, w, h], "area": w * h,
                     "iscrowd": 0})
        dets.append({"image_id": image, "category_id": cat if rng.random() < 0.7 else int(rng.integers(1, 81)),
                     "bbox": [x + float(rng.normal(0, 4)), y, w, h], "score": float(rng.random())})
    gt = {"images": images, "annotations": anns,
          "categories": [{"id": c, "name": f"category number {c}"} for c in range(1, 81)]}
    return gt, dets


def test_pictures_draw_the_numbers_with_labelled_axes_readable_with_80_classes():
    gt, dets = eighty_classes()
    analysis = evaluated(gt, dets).analysis(0.3)["bbox"]
    figures = eval_plots.figures(analysis)
    assert list(figures) == list(eval_plots.PICTURES)
    for name, fig in figures.items():
        for ax in fig.axes[:2] if name == "pr_curves" else fig.axes[:1]:
            assert ax.get_xlabel() and ax.get_ylabel() and ax.get_title(), name

    bars = figures["per_class_ap"].axes[0]
    widths = [p.get_width() for p in bars.patches]
    assert widths == sorted(analysis["per_class_AP"].values(), reverse=True) and len(widths) == 80
    labels = [t.get_text() for t in bars.get_yticklabels()]
    assert labels[0] == max(analysis["per_class_AP"], key=analysis["per_class_AP"].get)
    assert figures["per_class_ap"].get_figheight() >= 0.2 * 80  # a row per class, not squeezed

    matrix = figures["confusion_matrix"].axes[0]
    assert [t.get_text() for t in matrix.get_xticklabels()] == analysis["confusion"]["labels"]
    assert len(matrix.get_yticklabels()) == 81 and matrix.get_yticklabels()[0].get_fontsize() >= 4.5
    drawn = np.ma.filled(np.ma.masked_invalid(matrix.get_images()[0].get_array()).astype(float), 0.0)
    counts = np.array(analysis["confusion"]["matrix"])
    assert np.array_equal(drawn, counts / np.maximum(counts.sum(1, keepdims=True), 1))  # share of the row
    assert "score >= 0.3" in matrix.get_title()

    pr = figures["pr_curves"].axes[0]
    mean = pr.get_lines()[0].get_ydata()
    curves = np.array([c for c in analysis["pr_curves"]["0.5"].values()])
    assert np.allclose(mean, curves.mean(0))
    assert to_hex(pr.get_lines()[0].get_color()) == "#000000" and len(pr.get_lines()) == 6  # mean + worst 5

    sizes = figures["sizes"].axes[0]
    assert [p.get_height() for p in sizes.patches[:4]] == [analysis["sizes"][a]["AP"] for a in eval_plots.AREAS]


def test_eval_writes_the_pictures_and_visualize_redraws_them(tmp_path, nasty, capsys):
    gt, boxes, _ = nasty
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "dets.json").write_text(json.dumps(boxes))
    assert main(["eval", "--results", str(tmp_path / "dets.json"), "--annotations", str(tmp_path / "gt.json"),
                 "--output-dir", str(tmp_path / "ev")]) == 0
    pictures = sorted(p.name for p in (tmp_path / "ev" / "eval_pictures").iterdir())
    assert pictures == sorted(f"{n}.png" for n in eval_plots.PICTURES)
    assert all((tmp_path / "ev" / "eval_pictures" / p).read_bytes()[:4] == b"\x89PNG" for p in pictures)
    saved = json.loads((tmp_path / "ev" / "analysis.json").read_text())
    assert saved["bbox"]["confusion"]["matrix"] == naive_confusion(gt, boxes, 0.5).tolist()

    assert main(["visualize", "eval", str(tmp_path / "ev"), "--out", str(tmp_path / "again")]) == 0
    assert sorted(p.name for p in (tmp_path / "again").iterdir()) == pictures
    assert main(["visualize", "eval", str(tmp_path / "ev" / "metrics.json"), "--out", str(tmp_path / "m")]) == 0
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["per_class_ap.png", "sizes.png"]
    capsys.readouterr()
    assert main(["visualize", "eval", str(tmp_path / "ev"), "--out", str(tmp_path / "again")]) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert main(["visualize", "eval", str(tmp_path / "gt.json"), "--out", str(tmp_path / "x")]) == 1
    assert "neither analysis.json nor metrics.json" in capsys.readouterr().err


def test_each_validation_in_training_writes_the_pictures_and_tensorboard_images(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    assert main(["train"] + tiny_overrides(run, **{"train.epochs": 1, "train.max_iters_per_epoch": 1,
                                                   "train.tensorboard": "true", "train.tensorboard_images": 0,
                                                   "train.deterministic": "false", "model.rpe": "null",
                                                   "eval.pictures": "true"})) == 0
    assert sorted(p.stem for p in (run / "eval_pictures").iterdir()) == sorted(eval_plots.PICTURES)
    analysis = json.loads((run / "analysis.json").read_text())["bbox"]
    metrics = json.loads((run / "metrics.json").read_text())
    assert analysis["per_class_AP"] == metrics["per_class_AP"] and metrics["backend"] == "ultrafast"
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0}).Reload()
    assert sorted(events.Tags()["images"]) == sorted(f"eval/{n}" for n in eval_plots.PICTURES)
    assert events.Images("eval/confusion_matrix")[0].width > 300
