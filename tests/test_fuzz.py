"""Fuzzing (hypothesis): the iRPE spec parser and the annotation loader on malformed input.

Only the documented errors may escape: ``ValueError`` from the spec parser; ``AnnotationError``,
``DatasetNotFoundError`` and ``ImageDecodeError`` from the dataset; the check tool never raises.
A dataset that does construct gives finite targets for every item.
"""
import copy
import json
import math
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from detr_irpe.config import DataConfig
from detr_irpe.data import AnnotationError, CocoDetection, DatasetNotFoundError, ImageDecodeError, load_coco
from detr_irpe.data.check import check_dataset
from detr_irpe.data.transforms import make_train_transforms
from detr_irpe.data.validate import validate_coco_dict
from detr_irpe.irpe import parse_rpe_spec

DATA_ERRORS = (AnnotationError, DatasetNotFoundError, ImageDecodeError)
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# --- the spec parser --------------------------------------------------------------------------------

VALID_SPECS = ["rpe-2.0-product-ctx-1-k", "rpe-1.9-euc-bias-0-qk", "rpe-2.5-cross-ctx-0-qkv", "rpe-3-quant-bias-1-q"]
SPEC_CHARS = "rpe-0123456789.eE+_ nainfproductcuqnasxbiseklv\t\n\x00٣"


def parse_or_value_error(spec):
    try:
        config = parse_rpe_spec(spec)
    except ValueError as e:
        assert "rpe-{ratio}-{method}-{mode}-{shared_head}-{rpe_on}" in str(e)  # shows the format
        return None
    assert config.num_buckets >= 3  # a config that parses is usable
    return config


@FUZZ
@given(st.text(max_size=40))
def test_spec_parser_on_arbitrary_text(spec):
    parse_or_value_error(spec)


@FUZZ
@given(st.sampled_from(VALID_SPECS), st.integers(0, 5), st.text(alphabet=SPEC_CHARS, max_size=8))
def test_spec_parser_on_near_valid_field(spec, field, replacement):
    parts = spec.split("-")
    parts[field] = replacement
    parse_or_value_error("-".join(parts))


@FUZZ
@given(st.sampled_from(VALID_SPECS), st.lists(st.tuples(st.integers(0, 30), st.sampled_from(["del", "ins", "dup"]),
                                                       st.sampled_from(SPEC_CHARS)), max_size=4))
def test_spec_parser_on_character_edits(spec, edits):
    for position, kind, char in edits:
        position %= len(spec) + 1
        if kind == "del":
            spec = spec[:position] + spec[position + 1:]
        elif kind == "ins":
            spec = spec[:position] + char + spec[position:]
        else:
            spec = spec[:position] + spec[position:position + 3] + spec[position:]
    parse_or_value_error(spec)


@FUZZ
@given(st.one_of(st.floats(), st.integers(), st.sampled_from(["1e308", "1e-308", "-0", "0x10", "1_0", "nan", "-inf"])))
def test_spec_parser_on_any_ratio(ratio):
    parse_or_value_error(f"rpe-{ratio}-product-ctx-1-k")


def test_spec_parser_non_strings():
    for value in (None, 2.0, b"rpe-2.0-product-ctx-1-k", ["rpe"], {"a": 1}):
        with pytest.raises(ValueError):
            parse_rpe_spec(value)


# --- the annotation loader --------------------------------------------------------------------------

IMAGE_SIZES = [(40, 30), (24, 36), (50, 50)]


def base_dataset() -> dict:
    return {
        "images": [{"id": i + 1, "file_name": f"{i + 1}.png", "width": w, "height": h}
                   for i, (w, h) in enumerate(IMAGE_SIZES)],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [2, 3, 10, 8], "area": 80, "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 2, "bbox": [20.5, 4, 15, 20], "area": 300.0, "iscrowd": 0},
            {"id": 3, "image_id": 2, "category_id": 1, "bbox": [0, 0, 24, 36], "area": 864, "iscrowd": 1},
            {"id": 4, "image_id": 3, "category_id": 3, "bbox": [10, 10, 30, 5], "area": 150, "iscrowd": 0},
        ],
        "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}, {"id": 3, "name": "c"}],
    }


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz_images")
    for i, (w, h) in enumerate(IMAGE_SIZES):
        Image.fromarray(np.full((h, w, 3), 60 * i, np.uint8)).save(folder / f"{i + 1}.png")
    return folder


WEIRD = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(),  # floats include NaN and +-inf
    st.sampled_from([-1, 0, 1, 2, 3, 2**63, -2**63 - 1, 10**30, 10**400, 1e308, -1e308, 5e-324, "", "1", "NaN"]),
    st.text(max_size=4), st.just([]), st.just({}),
    st.lists(st.one_of(st.integers(-100, 100), st.floats(), st.text(max_size=2)), max_size=6),  # near-boxes
    st.dictionaries(st.sampled_from(["id", "bbox", "x"]), st.integers(-3, 3), max_size=2),
)

NUMBER = st.one_of(st.integers(-100, 200), st.floats(-1e3, 1e3), st.sampled_from([0, 0.0, -0.0, 1e-300, 1e300, -1e300]))


def paths(value, prefix=()):
    """Every place in a JSON value, as a tuple of keys / indices."""
    yield prefix
    if isinstance(value, dict):
        for key, item in value.items():
            yield from paths(item, prefix + (key,))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from paths(item, prefix + (index,))


def mutate(data, draw) -> object:
    """1-4 random edits: delete a key / item, replace a value, or duplicate a list entry."""
    for _ in range(draw(st.integers(1, 4))):
        every = list(paths(data))
        coordinates = [w for w in every if len(w) == 4 and w[0] == "annotations" and w[2] == "bbox"]
        where = draw(st.sampled_from(coordinates if coordinates and draw(st.booleans()) else every))
        kind = draw(st.sampled_from(["number"] * 5 + ["replace", "replace", "delete", "duplicate"]))
        if not where:
            if kind == "replace" and draw(st.integers(0, 9)) == 0:
                data = draw(WEIRD)  # the whole file
            continue
        parent = data
        for step in where[:-1]:
            parent = parent[step]
        last = where[-1]
        if kind == "delete":
            del parent[last]
        elif kind == "duplicate" and isinstance(parent, list):
            parent.append(copy.deepcopy(parent[last]))
        elif kind == "number" and isinstance(parent[last], (int, float)) and not isinstance(parent[last], bool):
            parent[last] = draw(NUMBER)  # valid JSON, maybe a degenerate or far-away box
        else:
            parent[last] = draw(WEIRD)
    return data


def write_json(folder: Path, data) -> Path:
    path = folder / "ann.json"
    path.write_text(json.dumps(data))  # NaN / Infinity literals and big integers included
    return path


def assert_finite_items(dataset):
    for index in range(len(dataset)):
        try:
            image, target = dataset[index]
        except (DatasetNotFoundError, ImageDecodeError):
            continue  # a mutated file_name / width / height: reported when the item loads
        boxes = target["boxes"]
        assert torch.isfinite(boxes).all() and torch.isfinite(target["area"]).all(), (index, target)
        assert (boxes[:, 2:] > 0).all() and ((boxes > -1e-6) & (boxes < 1 + 1e-6)).all(), (index, boxes)
        assert boxes.shape[0] == target["labels"].shape[0] == target["area"].shape[0]
        assert image.shape[0] == 3


@FUZZ
@given(st.data())
def test_loader_on_mutated_coco(image_dir, data):
    doc = mutate(base_dataset(), data.draw)
    with tempfile.TemporaryDirectory() as tmp:
        path = write_json(Path(tmp), doc)

        report = validate_coco_dict(json.loads(path.read_text()), str(path))  # never raises
        try:
            load_coco(path)
            loaded = True
        except AnnotationError as e:
            assert str(path) in str(e)
            loaded = False
        assert loaded == report.ok  # the same verdict as the check tool's

        transforms = make_train_transforms(DataConfig(train_scales=[24, 32], max_size=48, crop_resize=[32],
                                                      crop_min=8, crop_max=24)) if data.draw(st.booleans()) else None
        try:
            dataset = CocoDetection(image_dir, path, transforms)
        except DATA_ERRORS:
            assert not loaded
            event("refused at construction")
        else:
            event("constructed")
            assert loaded
            torch.manual_seed(0)
            assert_finite_items(dataset)

        checked = check_dataset(path, image_dir, workers=1)  # never raises
        assert checked.ok <= report.ok  # the image checks only add problems


@FUZZ
@given(st.one_of(st.binary(max_size=60), st.text(max_size=60),
                 st.sampled_from(['{"images": [', "[[[[[[[[", "1" * 5000, '{"images": NaN}', "\ufeff{}", ""])))
def test_loader_on_garbage_files(image_dir, content):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ann.json"
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")
        with pytest.raises(DATA_ERRORS):
            CocoDetection(image_dir, path)
        assert not check_dataset(path, image_dir, workers=1).ok


def test_deeply_nested_json(image_dir, tmp_path):
    path = tmp_path / "deep.json"
    path.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(AnnotationError, match="deep.json"):
        load_coco(path)
    assert math.isfinite(len(str(check_dataset(path, image_dir).errors)))
