"""Panoptic segmentation: PQ against a naive per-segment reference and hand-computed cases,
official DETR's panoptic post-processing against a naive per-pixel reference, the COCO panoptic
dataset and its checks."""
import io
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from detr_irpe.data import build_dataset, check_dataset
from detr_irpe.data.errors import AnnotationError, DataItemError
from detr_irpe.data.panoptic import CocoPanoptic, check_panoptic_dict
from detr_irpe.data.synthetic import STUFF, ensure_synthetic_dataset
from detr_irpe.config import load_config
from detr_irpe.evaluation import PanopticFormatError, PQStats, evaluate_panoptic
from detr_irpe.models import PostProcessPanoptic

# ---------------------------------------------------------------------------------------------
# PQ: a naive reference, one boolean mask per segment, straight from the definition

CATEGORIES = {1: {"id": 1, "isthing": 1}, 2: {"id": 2, "isthing": 1}, 3: {"id": 3, "isthing": 0},
              4: {"id": 4, "isthing": 0}}


def naive_counts(gt_ids, gt_segments, pred_ids, pred_segments):
    """{category: [sum IoU, TP, FP, FN]} of one image."""
    void = gt_ids == 0
    counts = {c: [0.0, 0, 0, 0] for c in CATEGORIES}
    matched_gt, matched_pred = set(), set()
    for g in gt_segments:
        if g.get("iscrowd", 0):
            continue
        gmask = gt_ids == g["id"]
        for p in pred_segments:
            if p["category_id"] != g["category_id"]:
                continue
            pmask = pred_ids == p["id"]
            inter = np.sum(gmask & pmask)
            union = np.sum(gmask | (pmask & ~void))
            if inter / union > 0.5:
                counts[g["category_id"]][0] += inter / union
                counts[g["category_id"]][1] += 1
                matched_gt.add(g["id"])
                matched_pred.add(p["id"])
    for g in gt_segments:
        if not g.get("iscrowd", 0) and g["id"] not in matched_gt:
            counts[g["category_id"]][3] += 1
    for p in pred_segments:
        if p["id"] in matched_pred:
            continue
        pmask = pred_ids == p["id"]
        crowd = np.zeros_like(void)
        for g in gt_segments:
            if g.get("iscrowd", 0) and g["category_id"] == p["category_id"]:
                crowd |= gt_ids == g["id"]
        if np.sum(pmask & (void | crowd)) / np.sum(pmask) <= 0.5:
            counts[p["category_id"]][2] += 1
    return counts


def naive_summary(counts):
    per_class, groups = {}, {"All": [], "Things": [], "Stuff": []}
    for c, (iou, tp, fp, fn) in counts.items():
        if tp + fp + fn == 0:
            per_class[c] = (0.0, 0.0, 0.0)
            continue
        per_class[c] = (iou / (tp + fp / 2 + fn / 2), iou / tp if tp else 0.0, tp / (tp + fp / 2 + fn / 2))
        groups["All"].append(per_class[c])
        groups["Things" if CATEGORIES[c]["isthing"] else "Stuff"].append(per_class[c])
    return per_class, {g: tuple(np.mean(v, axis=0)) if v else (0.0, 0.0, 0.0) for g, v in groups.items()}


def random_image(rng, size=24):
    """Ground truth with void and crowd regions, and a prediction that shifts, relabels, drops and
    invents segments."""
    gt = np.zeros((size, size), dtype=np.int64)
    gt_segments, pred_segments = [], []
    gt[:, :] = 1
    gt_segments.append({"id": 1, "category_id": 3, "iscrowd": 0})  # stuff background
    for k in range(int(rng.integers(2, 7))):
        y, x = rng.integers(0, size - 4, size=2)
        h, w = rng.integers(3, 12, size=2)
        sid = 10 + k
        gt[y:y + h, x:x + w] = sid
        gt_segments.append({"id": sid, "category_id": int(rng.choice([1, 2, 4])), "iscrowd": int(rng.random() < 0.2)})
    gt[rng.random((size, size)) < 0.08] = 0  # void pixels
    y = int(rng.integers(0, size - 3))
    gt[y:y + 3, :5] = 0  # a void block
    gt_segments = [s for s in gt_segments if np.any(gt == s["id"])]
    pred = np.zeros_like(gt)
    shift = rng.integers(-2, 3, size=2)
    shifted = np.roll(gt, tuple(shift), axis=(0, 1))
    for s in gt_segments:
        if rng.random() < 0.15:
            continue  # dropped: the region goes to whatever the background prediction is
        category = s["category_id"] if rng.random() > 0.15 else int(rng.choice([1, 2, 3, 4]))
        pid = 100 + s["id"]
        pred[shifted == s["id"]] = pid
        pred_segments.append({"id": pid, "category_id": category})
    for k in range(int(rng.integers(0, 3))):  # invented segments
        y, x = rng.integers(0, size - 3, size=2)
        pid = 300 + k
        pred[y:y + 4, x:x + 4] = pid
        pred_segments.append({"id": pid, "category_id": int(rng.choice([1, 2, 3, 4]))})
    present = set(np.unique(pred).tolist())
    pred_segments = [s for s in pred_segments if s["id"] in present]
    if 0 in present:  # some pixels unlabelled by the prediction: a segment of its own in the reference too
        pred[pred == 0] = 999
        pred_segments.append({"id": 999, "category_id": 3})
    return gt, gt_segments, pred, pred_segments


def test_pq_equals_a_naive_per_segment_reference_on_random_images_with_crowd_and_void():
    rng = np.random.default_rng(0)
    stats, total = PQStats(), {c: [0.0, 0, 0, 0] for c in CATEGORIES}
    kinds = set()
    for _ in range(60):
        gt, gts, pred, preds = random_image(rng)
        stats.add_image(gt, gts, pred, preds)
        one = PQStats()
        one.add_image(gt, gts, pred, preds)
        for c, values in naive_counts(gt, gts, pred, preds).items():
            total[c] = [a + b for a, b in zip(total[c], values)]
            assert one.tp.get(c, 0) == values[1] and one.fp.get(c, 0) == values[2] and one.fn.get(c, 0) == values[3]
            kinds |= {k for k, v in zip(("tp", "fp", "fn"), values[1:]) if v}
    assert kinds == {"tp", "fp", "fn"}
    result = stats.summarize(CATEGORIES)
    per_class, groups = naive_summary(total)
    for c, (pq, sq, rq) in per_class.items():
        assert result["per_class"][c] == pytest.approx({"pq": pq, "sq": sq, "rq": rq})
    for g, (pq, sq, rq) in groups.items():
        assert (result[g]["pq"], result[g]["sq"], result[g]["rq"]) == pytest.approx((pq, sq, rq))
    assert result["Things"]["n"] == 2 and result["Stuff"]["n"] == 2


def test_pq_stats_merged_from_parts_equal_the_whole():
    rng = np.random.default_rng(1)
    images = [random_image(rng) for _ in range(6)]
    whole, first, second = PQStats(), PQStats(), PQStats()
    for i, image in enumerate(images):
        whole.add_image(*image)
        (first if i % 2 else second).add_image(*image)
    assert first.merge(second).summarize(CATEGORIES) == whole.summarize(CATEGORIES)


def test_pq_hand_computed_cases():
    """A 4x4 image: thing 1 matched (IoU 6/8 once void is left out), thing 2 missed (FN), a crowd
    region of category 2 covering a predicted segment (not FP), a predicted thing on void (not FP),
    a predicted stuff segment over thing ground truth (FP of category 3, FN of category 1's second)."""
    gt = np.array([[1, 1, 1, 0],
                   [1, 1, 1, 0],
                   [2, 2, 5, 5],
                   [6, 6, 5, 5]])
    gt_segments = [{"id": 1, "category_id": 1}, {"id": 2, "category_id": 2}, {"id": 5, "category_id": 2, "iscrowd": 1},
                   {"id": 6, "category_id": 1}]
    pred = np.array([[7, 7, 7, 7],
                     [7, 7, 7, 7],
                     [9, 8, 8, 8],
                     [9, 9, 8, 8]])
    pred_segments = [{"id": 7, "category_id": 1}, {"id": 8, "category_id": 2}, {"id": 9, "category_id": 3}]
    stats = PQStats()
    stats.add_image(gt, gt_segments, pred, pred_segments)
    # 7 vs 1: inter 6, union 8 + 6 - 6 - 2 (7 on void) = 6 -> IoU 1.0; 8 (category 2): 4 of its 5 pixels on
    # the crowd region -> not FP; 2 (category 2) unmatched -> FN; 6 unmatched -> FN; 9 -> FP of category 3
    assert stats.tp == {1: 1} and stats.iou == {1: 1.0}
    assert stats.fn == {1: 1, 2: 1} and stats.fp == {3: 1}
    result = stats.summarize({1: {"isthing": 1}, 2: {"isthing": 1}, 3: {"isthing": 0}})
    assert result["per_class"][1] == pytest.approx({"pq": 1 / 1.5, "sq": 1.0, "rq": 1 / 1.5})
    assert result["per_class"][2] == {"pq": 0.0, "sq": 0.0, "rq": 0.0}
    assert result["Stuff"] == {"pq": 0.0, "sq": 0.0, "rq": 0.0, "n": 1}
    assert result["All"]["pq"] == pytest.approx((1 / 1.5) / 3) and result["All"]["n"] == 3


def test_iou_of_exactly_one_half_is_not_a_match():
    gt = np.array([[1, 1, 1, 1]])
    pred = np.array([[2, 2, 3, 3]])
    stats = PQStats()
    stats.add_image(gt, [{"id": 1, "category_id": 1}], pred, [{"id": 2, "category_id": 1}, {"id": 3, "category_id": 1}])
    assert stats.tp == {} and stats.fp == {1: 2} and stats.fn == {1: 1}


def _write_png(path, ids):
    ids = np.asarray(ids, dtype=np.int64)
    Image.fromarray(np.stack([ids % 256, ids // 256 % 256, ids // 65536], -1).astype(np.uint8)).save(path)


def test_evaluate_panoptic_reads_coco_panoptic_files_and_names_bad_ones(tmp_path):
    rng = np.random.default_rng(2)
    (tmp_path / "gt").mkdir()
    (tmp_path / "pred").mkdir()
    gt_json = {"annotations": [], "categories": list(CATEGORIES.values())}
    pred_json = {"annotations": []}
    stats = PQStats()
    for image_id in range(3):
        gt, gts, pred, preds = random_image(rng)
        stats.add_image(gt, gts, pred, preds)
        _write_png(tmp_path / "gt" / f"{image_id}.png", gt)
        _write_png(tmp_path / "pred" / f"{image_id}.png", pred)
        gt_json["annotations"].append({"image_id": image_id, "file_name": f"{image_id}.png", "segments_info": gts})
        pred_json["annotations"].append({"image_id": image_id, "file_name": f"{image_id}.png", "segments_info": preds})
    (tmp_path / "gt.json").write_text(json.dumps(gt_json))
    (tmp_path / "pred.json").write_text(json.dumps(pred_json))
    args = (tmp_path / "gt.json", tmp_path / "gt", tmp_path / "pred.json", tmp_path / "pred")
    result = evaluate_panoptic(*args)
    assert result == stats.summarize(CATEGORIES)
    assert set(result) == {"All", "Things", "Stuff", "per_class"} and 0 < result["All"]["pq"] < 1
    pred_json["annotations"][1]["segments_info"].pop()  # an id of the PNG no longer listed
    (tmp_path / "pred.json").write_text(json.dumps(pred_json))
    with pytest.raises(PanopticFormatError, match="image 1: the prediction PNG has segment id"):
        evaluate_panoptic(*args)
    (tmp_path / "gt" / "2.png").unlink()
    pred_json["annotations"].pop(1)
    (tmp_path / "pred.json").write_text(json.dumps(pred_json))
    with pytest.raises(PanopticFormatError, match="no prediction for image 1"):
        evaluate_panoptic(*args)


# ---------------------------------------------------------------------------------------------
# Post-processing: a naive per-pixel reference of official DETR's PostProcessPanoptic

def naive_postprocess(logits, mask_logits, is_thing, threshold, final):
    """Per pixel loops: keep, argmax, stuff merge, nearest resize, small-segment removal."""
    probs = logits.softmax(-1)
    kept = [q for q in range(len(logits)) if probs[q].argmax() != len(probs[q]) - 1 and probs[q].max() > threshold]
    classes = [int(probs[q].argmax()) for q in kept]
    masks = mask_logits[kept]
    h, w = masks.shape[-2:]

    def id_map(masks, classes, merge):
        ids = np.zeros((h, w), dtype=np.int64)
        for y in range(h):
            for x in range(w):
                values = masks[:, y, x].tolist()
                ids[y, x] = values.index(max(values)) if values else 0
        if merge:
            first = {}
            for k, c in enumerate(classes):
                if not is_thing[c]:
                    first.setdefault(c, k)
            ids = np.vectorize(lambda k: first.get(classes[k], k) if not is_thing[classes[k]] else k)(ids) if classes \
                else ids
        return np.asarray(Image.fromarray(ids.astype(np.int32), mode="I").resize(final[::-1], Image.NEAREST),
                          dtype=np.int64)

    ids = id_map(masks, classes, merge=True)
    while classes:
        area = [int(np.sum(ids == k)) for k in range(len(classes))]
        keep = [k for k, a in enumerate(area) if a > 4]
        if len(keep) == len(classes):
            break
        classes, masks = [classes[k] for k in keep], masks[keep]
        ids = id_map(masks, classes, merge=False)
    return ids, [(k, c, int(np.sum(ids == k))) for k, c in enumerate(classes)]


@pytest.mark.parametrize("seed", range(4))
def test_panoptic_postprocessing_equals_a_naive_per_pixel_reference(seed):
    g = torch.Generator().manual_seed(seed)
    num_queries, num_classes, size, final = 10, 5, (12, 14), (23, 30)
    is_thing = {0: True, 1: True, 2: False, 3: False, 4: False}
    logits = torch.randn(1, num_queries, num_classes + 1, generator=g)
    confident = torch.randperm(num_queries, generator=g)[:7]
    logits[0, confident, torch.randint(0, num_classes, (7,), generator=g)] += 8.0  # kept, stuff repeats likely
    logits[0, confident[0], 2] += 20  # at least one stuff pair
    logits[0, confident[1], 2] += 20
    masks = torch.randn(1, num_queries, 3, 4, generator=g) * 3
    masks[0, confident[2]] -= 4  # a query that wins almost nowhere: a small segment
    outputs = {"pred_logits": logits, "pred_masks": masks}
    result = PostProcessPanoptic(is_thing, threshold=0.85)(outputs, torch.tensor([size]), torch.tensor([final]))[0]
    upsampled = F.interpolate(masks, size=size, mode="bilinear", align_corners=False)[0]
    ids, segments = naive_postprocess(logits[0], upsampled, is_thing, 0.85, final)
    assert np.array_equal(result["ids"].numpy(), ids)
    assert [(s["id"], s["category_id"], s["area"]) for s in result["segments_info"]] == segments
    assert all(s["isthing"] == is_thing[s["category_id"]] for s in result["segments_info"])
    png = np.asarray(Image.open(io.BytesIO(result["png_string"])), dtype=np.int64)
    assert np.array_equal(png[..., 0] + 256 * png[..., 1] + 65536 * png[..., 2], ids)
    assert len(result["segments_info"]) >= 2


def test_panoptic_postprocessing_with_nothing_kept_gives_an_empty_map():
    logits = torch.zeros(1, 4, 3)
    logits[..., -1] = 10  # every query "no object"
    result = PostProcessPanoptic({0: True, 1: False})({"pred_logits": logits, "pred_masks": torch.randn(1, 4, 2, 2)},
                                                      torch.tensor([[8, 8]]), torch.tensor([[5, 7]]))[0]
    assert result["segments_info"] == [] and result["ids"].shape == (5, 7) and not result["ids"].any()


# ---------------------------------------------------------------------------------------------
# Data: the COCO panoptic dataset, the synthetic panoptic variant, the checks

@pytest.fixture(scope="module")
def panoptic_data(tmp_path_factory):
    return ensure_synthetic_dataset(tmp_path_factory.mktemp("panoptic") / "data", 6, 3, 48, panoptic=True,
                                    max_objects=4)


def _config(layout, *extra):
    return load_config("demo", layout.config_overrides() + ["model.query_groups=1", "model.masks=true",
                                                             f"model.num_classes={layout.num_classes}"] + list(extra))


def test_panoptic_targets_are_the_pngs_segments(panoptic_data):
    cfg = _config(panoptic_data)
    dataset = build_dataset(cfg.data, "train", transforms=lambda image, target: (image, target), masks=True)
    assert isinstance(dataset, CocoPanoptic) and len(dataset) == 6
    root = panoptic_data.root
    data = json.loads(open(f"{root}/annotations/panoptic_train.json").read())
    assert {c["id"]: c["isthing"] == 1 for c in data["categories"]} == dataset.is_thing_map
    assert sum(not t for t in dataset.is_thing_map.values()) == len(STUFF)
    for index, ann in enumerate(data["annotations"]):
        image, target = dataset[index]
        png = np.asarray(Image.open(f"{root}/panoptic_train/{ann['file_name']}"), dtype=np.int64)
        ids = png[..., 0] + 256 * png[..., 1] + 65536 * png[..., 2]
        assert ids.min() > 0  # the synthetic data labels every pixel
        for k, segment in enumerate(ann["segments_info"]):
            assert torch.equal(target["masks"][k].bool(), torch.from_numpy(ids == segment["id"]))
            assert target["labels"][k] == segment["category_id"]
            x, y, w, h = segment["bbox"]
            expected = torch.tensor([x + w / 2, y + h / 2, w, h]) / 48
            assert torch.allclose(target["boxes"][k], expected)
            assert target["area"][k] == segment["area"] == int(np.sum(ids == segment["id"]))
        assert target["iscrowd"].tolist() == [0] * len(ann["segments_info"])


def test_panoptic_problems_are_named_by_the_loader_and_check_data(panoptic_data, tmp_path):
    root = panoptic_data.root
    data = json.loads(open(f"{root}/annotations/panoptic_val.json").read())
    data["annotations"][0]["segments_info"].append({"id": 77, "category_id": 1, "iscrowd": 0, "area": 1,
                                                   "bbox": [0, 0, 1, 1]})  # absent from the PNG
    data["annotations"][1]["file_name"] = "missing.png"
    bad = tmp_path / "panoptic_val.json"
    bad.write_text(json.dumps(data))
    report = check_dataset(bad, f"{root}/val", panoptic=f"{root}/panoptic_val")
    assert {f.code for f in report.errors} == {"segment_absent", "png_missing"}
    text = " ".join(f.describe() for f in report.errors)
    assert "segment 77 of image 1" in text and "missing.png (image 2)" in text
    dataset = CocoPanoptic(f"{root}/val", bad, f"{root}/panoptic_val")
    with pytest.raises(DataItemError, match=r"segment id\(s\) \[77\] of image 1"):
        dataset[0]
    as_detection = check_dataset(bad, None)  # a panoptic json read as detection data says what it is
    assert "is a COCO panoptic file" in as_detection.findings["structure"].describe()
    data["categories"][0].pop("isthing")
    data["annotations"][2]["segments_info"][0]["id"] = 0
    with pytest.raises(AnnotationError, match="isthing") as error:
        check_panoptic_dict(data, "x.json")
    assert "(0 is void)" in str(error.value)


def test_segments_of_four_pixels_are_removed_and_five_kept():
    """Official DETR removes segments of at most 4 pixels; their pixels go to the next best query."""
    logits = torch.full((1, 3, 3), -10.0)
    logits[0, :, 0] = 10  # three confident thing queries of class 0
    masks = torch.zeros(1, 3, 4, 4)
    masks[0, 1, :2, :2] = 5  # query 1 wins 4 pixels
    masks[0, 2, 3, :] = 5  # query 2 wins 5 pixels
    masks[0, 2, 2, 3] = 5
    result = PostProcessPanoptic({1: False})({"pred_logits": logits, "pred_masks": masks},  # class 0 unlisted: a thing
                                             torch.tensor([[4, 4]]), torch.tensor([[4, 4]]))[0]
    assert [(s["id"], s["area"]) for s in result["segments_info"]] == [(0, 11), (1, 5)]
    assert all(s["isthing"] for s in result["segments_info"])
    assert result["ids"].tolist() == [[0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 1], [1, 1, 1, 1]]
