"""Synthetic shapes dataset: deterministic, cached, valid COCO, sensible objects."""
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from pycocotools.coco import COCO

from detr_irpe.data import CocoDetection, ensure_synthetic_dataset, num_classes_from_annotations
from detr_irpe.data.synthetic import SHAPES, draw_image
from helpers import process_context

REPO = Path(__file__).resolve().parents[1]
PARAMS = dict(num_train=24, num_val=8, image_size=64, seed=3)


def files(root: Path):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    ensure_synthetic_dataset(root, **PARAMS)
    return root


def test_deterministic_for_a_seed(shapes_root, tmp_path):
    again = ensure_synthetic_dataset(tmp_path / "again", **PARAMS)
    assert again.generated
    assert files(shapes_root) == files(tmp_path / "again")
    other = ensure_synthetic_dataset(tmp_path / "other", **{**PARAMS, "seed": 4})
    assert files(Path(other.root))["annotations/instances_train.json"] != \
        files(shapes_root)["annotations/instances_train.json"]


def test_cached_then_regenerated_on_new_parameters(tmp_path):
    root = tmp_path / "cache"
    assert ensure_synthetic_dataset(root, **PARAMS).generated
    mtimes = {p: p.stat().st_mtime_ns for p in root.rglob("*")}
    second = ensure_synthetic_dataset(root, **PARAMS)
    assert not second.generated
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == mtimes

    third = ensure_synthetic_dataset(root, **{**PARAMS, "num_train": 5})
    assert third.generated
    assert len(list((root / "train").iterdir())) == 5
    assert json.loads((root / "manifest.json").read_text())["num_train"] == 5

    (root / "val" / "000000.jpg").unlink()  # a damaged copy is regenerated too
    assert ensure_synthetic_dataset(root, **{**PARAMS, "num_train": 5}).generated


def test_refuses_a_foreign_folder(tmp_path):
    (tmp_path / "mine.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="manifest"):
        ensure_synthetic_dataset(tmp_path, **PARAMS)
    assert (tmp_path / "mine.txt").exists()


@pytest.mark.parametrize("split", ["train", "val"])
def test_valid_coco_with_sensible_objects(shapes_root, split):
    size = PARAMS["image_size"]
    ann_file = shapes_root / "annotations" / f"instances_{split}.json"
    coco = COCO(str(ann_file))
    assert len(coco.imgs) == PARAMS[f"num_{split}"]
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(SHAPES)
    per_image = Counter(a["image_id"] for a in coco.dataset["annotations"])
    assert set(per_image) == set(coco.imgs)  # every image has objects
    assert all(1 <= n <= 6 for n in per_image.values())
    for ann in coco.dataset["annotations"]:
        x, y, w, h = ann["bbox"]
        assert x >= 0 and y >= 0 and x + w <= size and y + h <= size
        assert 0.1 * size <= max(w, h) <= 0.5 * size + 1
        assert 0.3 * w * h <= ann["area"] <= w * h and ann["iscrowd"] == 0
    if split == "train":
        assert {a["category_id"] for a in coco.dataset["annotations"]} == set(coco.getCatIds())
    ds = CocoDetection(shapes_root / split, ann_file)
    image, target = ds[0]
    assert image.shape == (3, size, size) and len(target["labels"]) == per_image[ds.ids[0]]
    assert num_classes_from_annotations(ann_file) == len(SHAPES) + 1


def test_objects_stand_out_from_the_background():
    rng = np.random.default_rng(0)
    image, objects = draw_image(rng, 96, SHAPES, max_objects=1)
    pixels = np.asarray(image, dtype=np.float32)
    x, y, w, h = objects[0]["bbox"]
    inside = pixels[y + h // 2 - 1:y + h // 2 + 2, x + w // 2 - 1:x + w // 2 + 2].reshape(-1, 3).mean(0)
    corner = pixels[:4, :4].reshape(-1, 3).mean(0) if x > 4 and y > 4 else pixels[-4:, -4:].reshape(-1, 3).mean(0)
    assert np.linalg.norm(inside - corner) > 40


def test_options_and_validation(tmp_path):
    ds = ensure_synthetic_dataset(tmp_path / "three", 6, 2, 48, 0, max_objects=2, shapes=("square", "circle", "star"))
    coco = json.loads((Path(ds.root) / ds.train_annotations).read_text())
    assert [c["name"] for c in coco["categories"]] == ["square", "circle", "star"] and ds.num_classes == 4
    assert max(Counter(a["image_id"] for a in coco["annotations"]).values()) <= 2
    assert "data.train_annotations=annotations/instances_train.json" in ds.config_overrides()
    with pytest.raises(ValueError, match="shapes"):
        ensure_synthetic_dataset(tmp_path / "bad", shapes=("hexagon",))


def test_cli(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, str(REPO / "datasets" / "make_synthetic.py"), "--root", str(tmp_path / "cli"),
           "--num-train", "3", "--num-val", "2", "--image-size", "32", "--shapes", "circle", "square"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True).stdout
    assert out.startswith("generated") and "model.num_classes=3" in out
    assert len(list((tmp_path / "cli" / "train").iterdir())) == 3


def _generate_in_subprocess(root, queue):
    try:
        layout = ensure_synthetic_dataset(root, num_train=24, num_val=6, image_size=48, seed=5)
        queue.put(("ok", layout.generated))
    except Exception as e:  # reported to the parent
        queue.put(("error", repr(e)))


def test_concurrent_calls_take_turns(tmp_path):
    """Two processes on the same root (DDP ranks, two demos): one generates, the other reuses."""
    ctx = process_context()
    queue = ctx.Queue()
    root = str(tmp_path / "shared")
    procs = [ctx.Process(target=_generate_in_subprocess, args=(root, queue)) for _ in range(2)]
    for p in procs:
        p.start()
    results = sorted(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    assert results == [("ok", False), ("ok", True)], results
    assert len(json.loads((tmp_path / "shared" / "annotations" / "instances_train.json").read_text())["images"]) == 24
