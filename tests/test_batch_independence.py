"""An image's detections do not depend on the batch: the CNN sees each image unpadded in
evaluation and prediction (DETR's batch-size sensitivity, detr #63 / #191 / #217, comes from
convolutions seeing zero padding), and the Python API takes images in every common form."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from detr_irpe import Detector
from detr_irpe.data.images import read_rgb
from detr_irpe.engine.inference import load_detector
from detr_irpe.errors import UsageError
from helpers import COCO, tool

VAL = sorted((COCO / "val2017").glob("*.jpg"))
# float32 rounding of pixel coordinates up to 640: a few units in the last place
BOX_ATOL, SCORE_ATOL = 2e-4, 1e-6


def test_an_image_alone_equals_it_in_a_batch_of_four_sizes(tiny_checkpoint):
    detector = load_detector(str(tiny_checkpoint))
    images = [read_rgb(p) for p in VAL[:4]]
    assert len({tuple(i.shape) for i in images}) == 4
    alone = [detector.detect([image])[0] for image in images]
    batched = detector.detect(images)
    for a, b in zip(alone, batched):
        torch.testing.assert_close(b["boxes"], a["boxes"], rtol=0, atol=BOX_ATOL)
        torch.testing.assert_close(b["scores"], a["scores"], rtol=0, atol=SCORE_ATOL)
        assert torch.equal(a["labels"], b["labels"])
    detector.batched_backbone = True  # DETR's way: the CNN sees the padding, and the boxes move
    moved = detector.detect(images)
    assert max((a["boxes"] - b["boxes"]).abs().max() for a, b in zip(alone, moved)) > 100 * BOX_ATOL


def _detections(path):
    return json.loads(path.read_text())


def test_predict_and_eval_give_the_same_files_for_batch_sizes_1_and_4(tiny_checkpoint, tmp_path):
    for n in (1, 4):
        assert tool("predict").main(["--checkpoint", str(tiny_checkpoint), str(COCO / "val2017"), "--out",
                                     str(tmp_path / f"pred{n}"), "--threshold", "0", "--batch-size", str(n)]) == 0
        assert tool("eval").main(["--checkpoint", str(tiny_checkpoint), "--output-dir", str(tmp_path / f"eval{n}"),
                                  "--batch-size", str(n)]) == 0
    one, four = _detections(tmp_path / "pred1" / "detections.json"), _detections(tmp_path / "pred4" / "detections.json")
    assert [r["file"] for r in one] == [r["file"] for r in four] and len(one) == len(VAL)
    for a, b in zip(one, four):
        assert [d["label"] for d in a["detections"]] == [d["label"] for d in b["detections"]]
        np.testing.assert_allclose([d["box"] for d in a["detections"]], [d["box"] for d in b["detections"]],
                                   rtol=0, atol=1e-4)
        np.testing.assert_allclose([d["score"] for d in a["detections"]], [d["score"] for d in b["detections"]],
                                   rtol=0, atol=1e-4)
    one, four = _detections(tmp_path / "eval1" / "detections.json"), _detections(tmp_path / "eval4" / "detections.json")
    key = lambda d: (d["image_id"], d["category_id"], round(d["score"], 3))  # noqa: E731
    one, four = sorted(one, key=key), sorted(four, key=key)
    assert [(d["image_id"], d["category_id"]) for d in one] == [(d["image_id"], d["category_id"]) for d in four]
    np.testing.assert_allclose([d["bbox"] for d in one], [d["bbox"] for d in four], rtol=0, atol=1e-4)
    np.testing.assert_allclose([d["score"] for d in one], [d["score"] for d in four], rtol=0, atol=1e-4)


def test_detector_api_takes_every_kind_of_image(tiny_checkpoint):
    det = Detector.from_checkpoint(tiny_checkpoint, device="cpu")
    path = VAL[0]
    uint8 = read_rgb(path)
    forms = [str(path), path, Image.open(path), uint8, uint8.permute(1, 2, 0).numpy(), uint8.float() / 255]
    results = det.predict(forms, threshold=0.0)
    assert len(results) == len(forms)
    reference = results[0]
    assert reference and set(reference[0]) == {"box", "score", "label", "name"}
    assert all(r["score"] >= s["score"] for r, s in zip(reference, reference[1:]))  # best first
    for other in results[1:-1]:
        assert other == reference
    for got, want in zip(results[-1], reference):  # float input: the same up to uint8 -> float rounding
        assert got["label"] == want["label"] and got["score"] == pytest.approx(want["score"], abs=1e-5)
    assert det.predict(path, threshold=0.0) == [reference]  # one image: a list with one list
    assert det.predict(path, threshold=1.01) == [[]]
    names = {d["name"] for d in reference}
    assert names <= {"person", "bicycle", "car", "0"}  # the checkpoint's names; label 0 has none
    with pytest.raises(UsageError, match="PIL image"):
        det.predict(42)
    with pytest.raises(UsageError, match=r"\[0, 1\]"):
        det.predict(uint8.float())
