"""COCO dataset reading, batching and data errors, on the COCO subset in tests/data."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from detr_irpe.config import DataConfig
from detr_irpe.data import (AnnotationError, CocoDetection, DatasetNotFoundError, ImageDecodeError, build_dataloader,
                            build_dataset, category_names, collate_fn, load_coco, num_classes_from_annotations)

COCO_ROOT = Path(__file__).parent / "data" / "coco"
TRAIN_JSON = COCO_ROOT / "annotations" / "instances_train2017.json"
VAL_JSON = COCO_ROOT / "annotations" / "instances_val2017.json"
CROWD_IMAGE, EMPTY_IMAGE = 204805, 188416


def raw(split):
    return json.loads((COCO_ROOT / "annotations" / f"instances_{split}2017.json").read_text())


def dataset(split="train"):
    return CocoDetection(COCO_ROOT / f"{split}2017", COCO_ROOT / "annotations" / f"instances_{split}2017.json")


def item_of(ds, image_id):
    return ds[ds.ids.index(image_id)]


@pytest.mark.parametrize("split", ["train", "val"])
def test_boxes_are_normalised_cxcywh_of_the_json_boxes(split):
    data, ds = raw(split), dataset(split)
    images = {im["id"]: im for im in data["images"]}
    for image_id in ds.ids:
        image, target = item_of(ds, image_id)
        w, h = images[image_id]["width"], images[image_id]["height"]
        expected = []
        for a in data["annotations"]:
            if a["image_id"] != image_id or a["iscrowd"]:
                continue
            x, y, bw, bh = a["bbox"]
            x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + bw, w), min(y + bh, h)
            expected.append([(x0 + x1) / 2 / w, (y0 + y1) / 2 / h, (x1 - x0) / w, (y1 - y0) / h])
        assert target["boxes"].shape == (len(expected), 4)
        assert torch.allclose(target["boxes"], torch.tensor(expected).reshape(-1, 4), atol=1e-6)
        assert image.shape == (3, h, w) and image.dtype == torch.uint8
        assert target["orig_size"].tolist() == [h, w] == target["size"].tolist()
        assert target["image_id"].dtype == torch.int64 and int(target["image_id"]) == image_id


def test_one_box_by_hand():
    ds = dataset("val")
    ann = next(a for a in raw("val")["annotations"] if a["image_id"] == 404484 and not a["iscrowd"])
    x, y, w, h = ann["bbox"]  # image 404484 is 320 x 240
    _, target = item_of(ds, 404484)
    assert torch.allclose(target["boxes"][0], torch.tensor([(x + w / 2) / 320, (y + h / 2) / 240, w / 320, h / 240]))
    assert int(target["labels"][0]) == ann["category_id"]


def test_crowd_boxes_are_not_targets():
    data, ds = raw("train"), dataset("train")
    anns = [a for a in data["annotations"] if a["image_id"] == CROWD_IMAGE]
    crowd = [a for a in anns if a["iscrowd"]]
    assert crowd, "the test subset must keep a crowd annotation"
    _, target = item_of(ds, CROWD_IMAGE)
    assert len(target["labels"]) == len(anns) - len(crowd)
    assert target["iscrowd"].tolist() == [0] * len(target["labels"])
    # the crowd region is still in the ground truth the evaluator reads
    assert any(a["iscrowd"] for a in ds.coco.imgToAnns[CROWD_IMAGE])


def test_image_without_annotations_has_empty_targets():
    ds = dataset("train")
    assert EMPTY_IMAGE in ds.ids
    image, target = item_of(ds, EMPTY_IMAGE)
    assert target["boxes"].shape == (0, 4) and target["boxes"].dtype == torch.float32
    assert target["labels"].shape == (0,) and target["labels"].dtype == torch.int64
    assert target["area"].shape == (0,) and target["iscrowd"].shape == (0,)
    assert image.shape[0] == 3


def test_labels_are_coco_category_ids():
    ds = dataset("train")
    labels = torch.cat([ds[i][1]["labels"] for i in range(len(ds))])
    json_ids = {a["category_id"] for a in raw("train")["annotations"] if not a["iscrowd"]}
    assert set(labels.tolist()) == json_ids
    assert labels.max() > 80  # COCO ids run to 90 with gaps; contiguous indices would stop at 79/80
    assert num_classes_from_annotations(TRAIN_JSON) == 91 == ds.num_classes
    names = category_names(ds.coco)
    assert len(names) == 80 and names[1] == "person" and names[90] == "toothbrush"
    assert ds.categories == names


def write_coco(root: Path, images, annotations, categories=({"id": 1, "name": "thing"},)):
    (root / "images").mkdir(parents=True, exist_ok=True)
    data = {"images": list(images), "annotations": list(annotations), "categories": list(categories)}
    path = root / "ann.json"
    path.write_text(json.dumps(data))
    return root / "images", path


def write_image(path: Path, w=40, h=30):
    Image.fromarray(np.full((h, w, 3), 128, np.uint8)).save(path)


def test_boxes_are_clipped_and_degenerate_ones_dropped(tmp_path):
    anns = [
        {"id": 1, "image_id": 7, "category_id": 1, "bbox": [-5, 10, 20, 30], "area": 1, "iscrowd": 0},  # clipped
        {"id": 2, "image_id": 7, "category_id": 1, "bbox": [10, 10, 0, 5], "area": 0, "iscrowd": 0},  # zero width
        {"id": 3, "image_id": 7, "category_id": 1, "bbox": [45, 5, 10, 10], "area": 100, "iscrowd": 0},  # outside
    ]
    images, ann_file = write_coco(tmp_path, [{"id": 7, "file_name": "a.png", "width": 40, "height": 30}], anns)
    write_image(images / "a.png")
    _, target = CocoDetection(images, ann_file)[0]
    # [-5, 10, 15, 40] clipped to [0, 10, 15, 30] in a 40 x 30 image
    assert torch.allclose(target["boxes"], torch.tensor([[7.5 / 40, 20 / 30, 15 / 40, 20 / 30]]))
    assert target["labels"].tolist() == [1] and target["area"].tolist() == [1.0]


def test_build_dataset_from_config_uses_eval_size():
    cfg = DataConfig(root=str(COCO_ROOT), eval_size=200, max_size=1333)
    ds = build_dataset(cfg, "val")
    image, target = ds[0]
    assert image.dtype == torch.float32 and min(image.shape[-2:]) == 200
    assert target["size"].tolist() == list(image.shape[-2:])
    with pytest.raises(ValueError, match="split"):
        build_dataset(cfg, "test")


# --- batching --------------------------------------------------------------------------------

def test_collate_pads_and_masks():
    a, b = torch.ones(3, 4, 6), 2 * torch.ones(3, 5, 3)
    ta, tb = {"boxes": torch.zeros(1, 4)}, {"boxes": torch.zeros(0, 4)}
    images, masks, targets = collate_fn([(a, ta), (b, tb)])
    assert images.shape == (2, 3, 5, 6) and masks.shape == (2, 5, 6) and masks.dtype == torch.bool
    assert torch.equal(images[0, :, :4, :6], a) and images[0, :, 4:].abs().sum() == 0
    assert torch.equal(images[1, :, :5, :3], b) and images[1, :, :, 3:].abs().sum() == 0
    assert not masks[0, :4, :6].any() and masks[0, 4:].all()
    assert not masks[1, :5, :3].any() and masks[1, :, 3:].all()
    assert targets == [ta, tb]


def test_dataloader_batches():
    cfg = DataConfig(root=str(COCO_ROOT), train_scales=[96, 128], max_size=200, crop_resize=[128],
                     crop_min=64, crop_max=100, eval_size=128)
    train = build_dataset(cfg, "train")
    batches = list(build_dataloader(train, batch_size=4, train=True, num_workers=0))
    assert len(batches) == 1  # 6 images, drop_last
    images, masks, targets = batches[0]
    assert images.shape[0] == 4 and masks.shape == (4,) + images.shape[-2:] and len(targets) == 4
    for img_mask, t in zip(masks, targets):
        h, w = t["size"].tolist()
        assert not img_mask[:h, :w].any() and img_mask.sum() == img_mask.numel() - h * w

    val = build_dataset(cfg, "val")
    loader = build_dataloader(val, batch_size=4, train=False, num_workers=2)
    ids = [int(t["image_id"]) for _, _, ts in loader for t in ts]
    assert ids == val.ids  # every image, in order
    with pytest.raises(ValueError, match="batch_size"):
        build_dataloader(train, batch_size=7, train=True)


# --- errors ----------------------------------------------------------------------------------

def test_missing_annotation_file_and_image_folder(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="annotation file not found.*nope.json"):
        CocoDetection(COCO_ROOT / "val2017", tmp_path / "nope.json")
    with pytest.raises(DatasetNotFoundError, match="image folder not found.*no_images"):
        CocoDetection(tmp_path / "no_images", VAL_JSON)
    cfg = DataConfig(root=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="data.train_annotations"):
        build_dataset(cfg, "train")
    cfg = DataConfig(root=str(COCO_ROOT), val_images="missing_dir")
    with pytest.raises(FileNotFoundError, match="data.val_images='missing_dir'"):
        build_dataset(cfg, "val")


@pytest.mark.parametrize("content, message", [
    ("[]", "results file"),
    ('{"images": [], "categories": []}', "missing key.*'annotations'"),
    ("{not json", "not valid JSON"),
    ('{"images": {}, "annotations": [], "categories": []}', "'images' must be a list"),
])
def test_non_coco_json(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(AnnotationError, match=message) as err:
        load_coco(path)
    assert "bad.json" in str(err.value)
    assert isinstance(err.value, ValueError)


def test_unknown_category_and_image(tmp_path):
    image = {"id": 1, "file_name": "a.png", "width": 40, "height": 30}
    ann = {"id": 5, "image_id": 1, "category_id": 3, "bbox": [0, 0, 5, 5], "iscrowd": 0}
    _, path = write_coco(tmp_path, [image], [ann])
    with pytest.raises(AnnotationError, match=r"annotation 5 \(image 1\) has category_id 3.*ids \[1\]"):
        load_coco(path)
    _, path = write_coco(tmp_path, [image], [dict(ann, category_id=1, image_id=9)])
    with pytest.raises(AnnotationError, match="image_id 9"):
        load_coco(path)


def test_empty_dataset(tmp_path):
    images, path = write_coco(tmp_path, [], [])
    with pytest.raises(AnnotationError, match="no images"):
        CocoDetection(images, path)


def test_missing_and_undecodable_image(tmp_path):
    entries = [{"id": 11, "file_name": "gone.jpg", "width": 40, "height": 30},
               {"id": 12, "file_name": "broken.jpg", "width": 40, "height": 30},
               {"id": 13, "file_name": "big.png", "width": 40, "height": 30}]
    images, path = write_coco(tmp_path, entries, [])
    (images / "broken.jpg").write_bytes(b"this is not a jpeg")
    write_image(images / "big.png", w=50, h=30)
    ds = CocoDetection(images, path)
    with pytest.raises(DatasetNotFoundError, match=r"gone\.jpg \(image id 11"):
        ds[0]
    with pytest.raises(ImageDecodeError, match=r"broken\.jpg \(image id 12\)"):
        ds[1]
    with pytest.raises(ImageDecodeError, match=r"big\.png \(image id 13\) is 50x30 .* says 40x30"):
        ds[2]


def test_truncated_jpeg_is_reported(tmp_path):
    images, path = write_coco(tmp_path, [{"id": 1, "file_name": "cut.jpg", "width": 213, "height": 140}], [])
    data = (COCO_ROOT / "train2017" / "000000425989.jpg").read_bytes()
    (images / "cut.jpg").write_bytes(data[: len(data) // 3])
    with pytest.raises(ImageDecodeError, match=r"cut\.jpg \(image id 1\)"):
        CocoDetection(images, path)[0]


def test_custom_dataset_through_config(tmp_path):
    shutil.copytree(COCO_ROOT / "val2017", tmp_path / "pics")
    data = raw("val")
    (tmp_path / "labels.json").write_text(json.dumps(data))
    cfg = DataConfig(root=str(tmp_path), val_images="pics", val_annotations=str(tmp_path / "labels.json"))
    ds = build_dataset(cfg, "val")
    assert len(ds) == len(data["images"]) and ds.num_classes == 91


def test_batches_resume_mid_epoch_and_ignore_worker_count():
    from detr_irpe.data import set_epoch

    cfg = DataConfig(root=str(COCO_ROOT), train_scales=[64, 80, 96], max_size=128, crop_resize=[96],
                     crop_min=48, crop_max=80)
    train = build_dataset(cfg, "train")

    def epoch_batches(num_workers, start=0):
        loader = build_dataloader(train, batch_size=2, train=True, num_workers=num_workers, seed=7)
        set_epoch(loader, 3, start=start)
        return [(images, [t["boxes"] for t in targets]) for images, _, targets in loader]

    full = epoch_batches(0)
    assert len(full) == 3
    for (a, boxes_a), (b, boxes_b) in zip(full[1:], epoch_batches(2, start=2)):
        assert torch.equal(a, b) and all(torch.equal(x, y) for x, y in zip(boxes_a, boxes_b))


def test_cached_images_give_the_same_items_and_are_decoded_once(monkeypatch):
    from PIL import Image as PILImage

    from detr_irpe.data import set_epoch

    cfg = DataConfig(root=str(COCO_ROOT), train_scales=[64, 96], max_size=128, crop_resize=[])
    opened = []
    real_open = PILImage.open
    monkeypatch.setattr(PILImage, "open", lambda *a, **k: opened.append(a[0]) or real_open(*a, **k))
    plain, cached = build_dataset(cfg, "train"), build_dataset(DataConfig(**{**cfg.__dict__, "cache_images": True}),
                                                                "train")
    for epoch in range(2):
        batches = []
        for data in (plain, cached):
            loader = build_dataloader(data, batch_size=2, train=True, seed=3)
            set_epoch(loader, epoch)
            batches.append(list(loader))
        for (ia, ma, ta), (ib, mb, tb) in zip(*batches):  # same augmentations, same items
            assert torch.equal(ia, ib) and torch.equal(ma, mb)
            assert all(torch.equal(a["boxes"], b["boxes"]) for a, b in zip(ta, tb))
    n = len(plain)
    assert len(opened) == 2 * n + n  # the plain dataset decodes every epoch, the cached one once
