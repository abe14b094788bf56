"""Export to ONNX / torch.export: onnxruntime and the loaded program compute what PyTorch computes.

Two models are exported to ONNX, once each (module fixtures, they dominate this file's time): a tiny
DETR whose four encoder layers carry the four iRPE methods (bias and ctx, on q, k and v, shared and
per-head tables, random tables), and a plain tiny DETR written to a checkpoint and exported by
``tools/export.py``. Both are checked on padded batches of sizes not used at export. A ``torch.export``
program (``.pt2``) is written, loaded back and checked by the exporter itself, once, for a checkpoint of
the iRPE release.
"""
import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from detr_irpe import Detector
from detr_irpe.apps.predict import SkippedImageWarning, predict_onnx, predict_path
from detr_irpe.config import Config
from detr_irpe.data.transforms import model_input_transform
from detr_irpe.engine.inference import LoadedDetector, load_detector
from detr_irpe.errors import InputNotFoundError, UsageError
from detr_irpe.export import (
    ExportMismatchError, OnnxDetector, Preprocessing, UnsupportedImageError, export_checkpoint, onnx_session,
    run_onnx, sidecar_path,
)
from detr_irpe.export.exporter import check_options, _check
from detr_irpe.export.program import InputLimits, sample_inputs
from detr_irpe.irpe import RPEMultiheadAttention
from detr_irpe.irpe.buckets import TABLE_METHODS, bucket_ids_2d
from detr_irpe.models.backbone import mask_to_feature
from helpers import COCO, TINY, randomize_tables, save_tiny_checkpoint, tiny_model, tool

# one encoder layer per method; together: bias and ctx, q / k / v, shared and per-head tables
SPECS = ["rpe-2.0-product-ctx-1-qkv", "rpe-2.0-euc-bias-0-qk", "rpe-1.9-quant-bias-1-qk", "rpe-2.5-cross-ctx-0-qkv"]
# (batch, height, width) never used at export (traced at 67 x 101, checked at 87 x 50)
NEW_SIZES = [(3, 64, 160), (2, 113, 70), (3, 150, 97)]
CATEGORIES = {0: "circle", 1: "square", 2: "triangle", 3: "star"}
SIZES = dict(eval_size=96, max_size=160)


def max_diffs(got, want):
    return {k: float((got[k] - want[k]).detach().abs().max()) for k in ("pred_logits", "pred_boxes")}


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """The four-method model exported by ``Detector.export_onnx`` (which checks the ONNX model on a padded
    batch). Returns (model, export result, onnx session)."""
    model = tiny_model(SPECS[0], enc_layers=len(SPECS), dec_layers=1)  # the plain model has two
    for layer, spec in zip(model.transformer.encoder.layers, SPECS):
        layer.self_attn = RPEMultiheadAttention(TINY["hidden_dim"], TINY["nheads"], dropout=0.1, rpe=spec)
    randomize_tables(model)
    cfg = Config()
    cfg.data.eval_size, cfg.data.max_size = SIZES["eval_size"], SIZES["max_size"]
    out = tmp_path_factory.mktemp("mixed")
    detector = Detector(LoadedDetector(model.eval(), None, cfg, CATEGORIES))
    result = detector.export_onnx(out / "mixed.onnx")
    return model, result, onnx_session(result.model_path)


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """A plain DETR (learned position embedding) saved as a checkpoint and exported by tools/export.py.
    Returns (the loaded checkpoint, the checkpoint path, the ONNX path)."""
    out = tmp_path_factory.mktemp("plain")
    checkpoint = save_tiny_checkpoint(out / "checkpoint.pth", rpe=None, categories=CATEGORIES,
                                      model_options={"position_embedding": "learned"}, **SIZES)
    assert tool("export").main(["--checkpoint", str(checkpoint), "--out", str(out / "plain.onnx")]) == 0
    return load_detector(str(checkpoint)), checkpoint, out / "plain.onnx"


@pytest.mark.parametrize("batch, height, width", NEW_SIZES)
def test_onnx_equals_pytorch_for_every_irpe_method_on_new_sizes(mixed, batch, height, width):
    model, _, session = mixed
    images, mask = sample_inputs(batch, (height, width), seed=height)
    with torch.no_grad():
        want = model(images, mask)
    diffs = max_diffs(run_onnx(session, images, mask), want)
    assert max(diffs.values()) <= 1e-4, diffs


@pytest.mark.parametrize("batch, height, width", NEW_SIZES)
def test_onnx_equals_pytorch_for_plain_detr_exported_by_the_cli(plain, batch, height, width):
    detector, _, onnx_path = plain
    images, mask = sample_inputs(batch, (height, width), seed=width)
    with torch.no_grad():
        want = detector.model(images, mask)
    diffs = max_diffs(run_onnx(onnx_session(onnx_path), images, mask), want)
    assert max(diffs.values()) <= 1e-4, diffs


def test_sidecar_holds_what_preprocessing_and_decoding_need(plain, mixed):
    info = json.loads(sidecar_path(plain[2]).read_text())
    assert (info["format"], info["model_file"], info["opset"]) == ("onnx", "plain.onnx", 20)
    assert info["categories"] == {str(k): v for k, v in CATEGORIES.items()}
    assert info["preprocess"]["eval_size"] == 96 and info["preprocess"]["max_size"] == 160
    assert info["preprocess"]["mean"] == [0.485, 0.456, 0.406] and info["preprocess"]["std"] == [0.229, 0.224, 0.225]
    assert [i["name"] for i in info["inputs"]] == ["images", "mask"]
    assert info["inputs"][0]["shape"] == ["batch", 3, "height", "width"] and info["inputs"][1]["dtype"] == "bool"
    assert [(o["name"], o["shape"]) for o in info["outputs"]] == [("pred_logits", ["batch", 5, 5]),
                                                                   ("pred_boxes", ["batch", 5, 4])]
    assert info["input_size"] == {"min_side": 17, "max_side": 800, "backbone_stride": 16}  # learned: 50 cells
    assert info["irpe"] == [None]
    assert info["checked_against_pytorch"]["max_abs_diff"]["pred_boxes"] <= 1e-4
    mixed_info = json.loads(mixed[1].sidecar_path.read_text())
    assert (mixed_info["format"], mixed_info["irpe"]) == ("onnx", SPECS)
    assert mixed_info["input_size"]["max_side"] is None  # a sine position embedding takes any size


def test_onnx_detector_detections_equal_the_pytorch_detectors(plain):
    detector, _, onnx_path = plain
    image = torch.randint(0, 256, (3, 70, 131), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    batch = model_input_transform(detector.config.data)(image)[None]
    with torch.no_grad():
        outputs = detector.model(batch, torch.zeros(1, *batch.shape[-2:], dtype=torch.bool))
    want = detector.postprocessor(outputs, torch.tensor([[70, 131]]))[0]
    onnx = OnnxDetector(onnx_path)
    got = onnx.detect([image])[0]
    assert onnx.categories == CATEGORIES
    assert torch.equal(got["labels"], want["labels"])
    torch.testing.assert_close(got["scores"], want["scores"], rtol=0, atol=1e-4)
    torch.testing.assert_close(got["boxes"], want["boxes"], rtol=0, atol=1e-4)


def test_predict_with_onnx_writes_the_detections_of_predict_with_the_checkpoint(plain, tmp_path):
    _, checkpoint, onnx_path = plain
    images = sorted((COCO / "val2017").glob("*.jpg"))[:4]  # four sizes, batched two by two with padding
    runs = {}
    for flag, model in (("--checkpoint", checkpoint), ("--onnx", onnx_path)):
        out = tmp_path / flag.strip("-")
        argv = [flag, str(model), "--out", str(out), "--threshold", "0", "--batch-size", "2", *map(str, images)]
        assert tool("predict").main(argv) == 0
        runs[flag] = json.loads((out / "detections.json").read_text())
        assert sorted(p.name for p in out.glob("*.png")) == sorted(f"{i.stem}.png" for i in images)
    for want, got in zip(runs["--checkpoint"], runs["--onnx"]):
        assert (got["file"], got["height"], got["width"]) == (want["file"], want["height"], want["width"])
        assert [d["label"] for d in got["detections"]] == [d["label"] for d in want["detections"]]
        np.testing.assert_allclose([d["box"] for d in got["detections"]], [d["box"] for d in want["detections"]],
                                   rtol=0, atol=1e-3)  # pixels of images up to 640 wide: 1e-4 of 640 / 96
        np.testing.assert_allclose([d["score"] for d in got["detections"]],
                                   [d["score"] for d in want["detections"]], rtol=0, atol=1e-4)


def test_predict_with_a_truncated_onnx_model_says_so(plain, tmp_path, capsys):
    onnx_path = plain[2]
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(onnx_path.read_bytes()[:5000])
    sidecar_path(cut).write_text(sidecar_path(onnx_path).read_text())
    code = tool("predict").main(["--onnx", str(cut), str(COCO / "val2017"), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("error: ONNX Runtime cannot load") and "Traceback" not in err


def assert_same_records(got, want):
    """Per image, the records of Detector.predict / OnnxDetector.predict / detections.json agree."""
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert [(d["label"], d["name"]) for d in g] == [(d["label"], d["name"]) for d in w]
        np.testing.assert_allclose([d["score"] for d in g], [d["score"] for d in w], rtol=0, atol=1e-4)
        np.testing.assert_allclose(np.reshape([d["box"] for d in g], (-1, 4)),
                                   np.reshape([d["box"] for d in w], (-1, 4)), rtol=0, atol=1e-2)


def test_onnx_detector_predict_takes_what_detector_predict_takes_and_gives_the_same_records(plain):
    loaded, _, onnx_path = plain
    paths = sorted((COCO / "val2017").glob("*.jpg"))[:3]
    forms = [str(paths[0]), Image.open(paths[1]), torch.from_numpy(np.asarray(Image.open(paths[2])).copy())]
    want = Detector(loaded).predict(forms, threshold=0.0, batch_size=2)
    got = OnnxDetector(onnx_path).predict(forms, threshold=0.0, batch_size=2)
    assert all(len(found) == TINY["num_queries"] for found in want)  # threshold 0: every query compared
    assert {d["name"] for found in got for d in found} <= set(CATEGORIES.values())
    assert_same_records(got, want)
    float_image = forms[2].permute(2, 0, 1).float() / 255  # (3, H, W) in [0, 1]; one image, not a list
    assert_same_records(OnnxDetector(onnx_path).predict(float_image, threshold=0.0),
                        Detector(loaded).predict(float_image, threshold=0.0))


def extreme_images(folder):
    """A 2000 x 40 and a 40 x 2000 (width x height) image: resized to 3 x 160 and 160 x 3 pixels, below
    the 17 pixels the plain export takes."""
    folder.mkdir(parents=True, exist_ok=True)
    generator = np.random.default_rng(0)
    paths = []
    for name, (width, height) in (("wide.png", (2000, 40)), ("tall.png", (40, 2000))):
        Image.fromarray(generator.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(folder / name)
        paths.append(folder / name)
    return paths


def test_predict_with_onnx_skips_an_image_of_extreme_aspect_ratio_by_name_and_goes_on(plain, tmp_path):
    _, checkpoint, onnx_path = plain
    photos = tmp_path / "photos"
    wide, tall = extreme_images(photos)
    shutil.copy(sorted((COCO / "val2017").glob("*.jpg"))[0], photos / "coco.jpg")
    with pytest.warns(SkippedImageWarning) as caught:
        got = predict_onnx(onnx_path, photos, tmp_path / "onnx", threshold=0.0, batch_size=2)
    want = predict_path(str(checkpoint), photos, tmp_path / "torch", threshold=0.0, device="cpu", batch_size=2)
    assert [r["file"] for r in got] == [r["file"] for r in want] == [str(photos / "coco.jpg"), str(tall), str(wide)]
    skipped = [str(w.message) for w in caught if issubclass(w.category, SkippedImageWarning)]
    assert len(skipped) == 2 and str(tall) in skipped[0] and str(wide) in skipped[1]
    assert all("takes sides from 17" in message and "--checkpoint" in message for message in skipped)
    assert json.loads((tmp_path / "onnx" / "detections.json").read_text()) == got  # the run completed
    assert str(wide) in got[2]["error"] and got[2]["detections"] == [] and "picture" not in got[2]
    assert (got[1]["height"], got[1]["width"]) == (2000, 40)
    assert sorted(p.name for p in (tmp_path / "onnx").iterdir()) == ["coco.png", "detections.json"]
    assert all(len(r["detections"]) == TINY["num_queries"] for r in want)  # PyTorch takes every size
    assert_same_records([got[0]["detections"]], [want[0]["detections"]])


def test_onnx_detector_names_the_image_it_cannot_take(plain, tmp_path):
    onnx = OnnxDetector(plain[2])
    wide, _ = extreme_images(tmp_path)
    with pytest.raises(UnsupportedImageError, match=f"{wide}: .*3 x 160 pixels.*takes sides from 17"):
        onnx.predict([str(COCO / "val2017" / "000000404484.jpg"), str(wide)])
    with pytest.raises(UnsupportedImageError, match="image 1: "):
        onnx.detect([torch.zeros(3, 50, 60, dtype=torch.uint8), torch.zeros(3, 40, 2000, dtype=torch.uint8)])
    assert onnx.image_problem(torch.zeros(3, 480, 640, dtype=torch.uint8)) is None


def test_an_image_above_the_largest_side_of_a_learned_position_embedding_is_refused(plain, tmp_path):
    """The plain export takes sides up to 800 (50 cells of stride 16); a sidecar whose resize keeps larger
    images (max_size 1000) lets one through, which the runner refuses by its size."""
    info = json.loads(sidecar_path(plain[2]).read_text())
    info["preprocess"].update(eval_size=700, max_size=1000)
    sidecar = tmp_path / "big.json"
    sidecar.write_text(json.dumps(info))
    onnx = OnnxDetector(plain[2], sidecar=sidecar)
    problem = onnx.image_problem(torch.zeros(3, 700, 1000, dtype=torch.uint8))  # kept at 700 x 1000
    assert problem is not None and "700 x 1000 pixels" in problem and "from 17 to 800" in problem
    assert onnx.image_problem(torch.zeros(3, 900, 1000, dtype=torch.uint8)) is None  # resized to 700 x 777


def test_an_export_made_before_sidecars_were_named_after_the_model_still_loads(plain, tmp_path):
    onnx_path = plain[2]
    info = json.loads(sidecar_path(onnx_path).read_text())
    shutil.copy(onnx_path, tmp_path / "old.onnx")
    (tmp_path / "old.json").write_text(json.dumps({**info, "model_file": "old.onnx"}))  # the former name
    onnx = OnnxDetector(tmp_path / "old.onnx")
    assert onnx.categories == CATEGORIES
    image = torch.randint(0, 256, (3, 70, 131), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    assert_same_records(onnx.predict(image, threshold=0.0), OnnxDetector(onnx_path).predict(image, threshold=0.0))
    shutil.copy(onnx_path, tmp_path / "other.onnx")
    (tmp_path / "other.json").write_text(json.dumps({**info, "model_file": "another.onnx"}))
    with pytest.raises(InputNotFoundError, match="other.onnx.json.*describes another model file"):
        OnnxDetector(tmp_path / "other.onnx")


def test_onnx_detector_gives_an_image_the_same_detections_whatever_it_is_batched_with(plain):
    onnx = OnnxDetector(plain[2])
    generator = torch.Generator().manual_seed(4)
    images = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=generator)
              for h, w in [(70, 131), (120, 90), (50, 200)]]
    images.insert(2, images[0].clone())  # batched with itself, and with images of other sizes
    alone = onnx.detect(images[:1])[0]
    batched = onnx.detect(images, batch_size=4)
    for key in ("labels", "scores", "boxes"):
        assert torch.equal(batched[0][key], alone[key]) and torch.equal(batched[2][key], alone[key]), key


def test_onnx_detector_refuses_a_batch_below_the_exported_minimum(plain):
    onnx = OnnxDetector(plain[2])
    with pytest.raises(UsageError, match="from 17 pixels"):
        onnx(torch.zeros(1, 3, 16, 40), torch.zeros(1, 16, 40, dtype=torch.bool))


@pytest.mark.parametrize("size", [(70, 131), (480, 640), (1, 500), (2000, 3), (96, 96), (33, 1000)])
def test_preprocessing_equals_the_evaluation_transform(size):
    cfg = Config().data
    cfg.eval_size, cfg.max_size = SIZES["eval_size"], SIZES["max_size"]
    image = torch.randint(0, 256, (3, *size), dtype=torch.uint8, generator=torch.Generator().manual_seed(size[0]))
    assert torch.equal(Preprocessing(cfg.eval_size, cfg.max_size)(image), model_input_transform(cfg)(image))


def test_feature_mask_picks_the_cells_of_nearest_interpolation():
    for n_in in range(1, 260, 3):
        mask = torch.rand(1, n_in, n_in + 1, generator=torch.Generator().manual_seed(n_in)) > 0.5
        for n_out in range(1, 40):
            size = (n_out, max(1, n_out - 3))
            want = F.interpolate(mask[None].float(), size=size).to(torch.bool)[0]
            assert torch.equal(mask_to_feature(mask, size), want), (n_in, n_out)


@pytest.mark.parametrize("opset, why", [(17, "Below 18"), (23, "Attention operator")])
def test_unsupported_opsets_are_refused_before_loading(tmp_path, capsys, opset, why):
    with pytest.raises(UsageError, match=why):
        export_checkpoint(str(tmp_path / "missing.pth"), tmp_path / "m.onnx", opset=opset)
    code = tool("export").main(["--checkpoint", str(tmp_path / "missing.pth"), "--out", str(tmp_path / "m.onnx"),
                                "--opset", str(opset)])
    assert code != 0 and f"error: ONNX opset {opset}" in capsys.readouterr().err


def test_bad_output_names_are_refused(tmp_path):
    with pytest.raises(UsageError, match="sidecar"):
        check_options(tmp_path / "model.json", "onnx", None)
    with pytest.raises(UsageError, match="ONNX only"):
        check_options(tmp_path / "model.pt2", "torch-export", 18)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_torchscript_tracing_of_irpe_is_refused():
    class SelfAttention(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = RPEMultiheadAttention(8, 2, rpe="rpe-2.0-product-ctx-1-k")

        def forward(self, x):
            return self.attn(x, x, x, hw=(3, 4))[0]

    with pytest.raises(RuntimeError, match="torch.jit.trace"):
        torch.jit.trace(SelfAttention().eval(), (torch.randn(12, 1, 8),))


def test_a_disagreeing_export_is_an_error(mixed):
    model, _, session = mixed
    images, mask = sample_inputs(2, (64, 64))

    def off_by_a_little(x, m):
        out = run_onnx(session, x, m)
        return {**out, "pred_logits": out["pred_logits"] + 0.01}

    with pytest.raises(ExportMismatchError, match="disagrees"):
        _check(off_by_a_little, model, images, mask, "ONNX model")


def test_bucket_ids_computed_in_onnx_equal_bucket_ids_2d(tmp_path):
    # every method, and each of the two ratios for two of them: a small one and one whose exact range
    # (beyond which offsets are bucketed by their logarithm) the sizes below span and exceed
    ratios = dict(zip(TABLE_METHODS, (1.9, 7.3, 7.3, 1.9)))

    class Ids(torch.nn.Module):
        def forward(self, x):
            h, w = x.shape[-2:]
            return tuple(bucket_ids_2d(m, h, w, r)[0] for m, r in ratios.items())

    dims = {"x": {2: torch.export.Dim("h", min=2), 3: torch.export.Dim("w", min=2)}}
    program = torch.export.export(Ids(), (torch.zeros(1, 1, 5, 7),), dynamic_shapes=dims)
    torch.onnx.export(program, dynamo=True, verbose=False).save(str(tmp_path / "ids.onnx"))
    session = onnx_session(tmp_path / "ids.onnx")
    for h, w in [(2, 3), (40, 9), (33, 47), (1, 120)]:
        got = session.run(None, {"x": np.zeros((1, 1, h, w), np.float32)})
        want = [bucket_ids_2d(m, h, w, r)[0].numpy() for m, r in ratios.items()]
        assert all(np.array_equal(g, wn) for g, wn in zip(got, want)), (h, w)


def test_an_irpe_model_zoo_checkpoint_exports_as_a_program_beside_another_export(plain, tmp_path):
    """The release's format (DETR's ``args`` Namespace with ``enc_rpe2d``, no config of ours; the tiny
    backbone so that the test stays fast) exported as a ``torch.export`` program, which the exporter
    loads back and checks on a padded batch of another size than it traced. Written into a folder
    holding an ONNX export: each keeps its own sidecar."""
    import argparse

    spec = "rpe-2.0-product-ctx-1-k"
    model = tiny_model(spec, num_classes=91)
    args = argparse.Namespace(backbone="tiny", dilation=False, position_embedding="sine",
                              hidden_dim=TINY["hidden_dim"], nheads=TINY["nheads"], enc_layers=TINY["enc_layers"],
                              dec_layers=TINY["dec_layers"], dim_feedforward=TINY["dim_feedforward"], dropout=0.1,
                              pre_norm=False, num_queries=TINY["num_queries"], enc_rpe2d=spec, aux_loss=True,
                              dataset_file="coco", masks=False)
    checkpoint = tmp_path / "irpe_detr.pth"
    torch.save({"model": model.state_dict(), "optimizer": {}, "epoch": 149, "args": args}, checkpoint)
    onnx_path = plain[2]
    shutil.copy(onnx_path, tmp_path / "model.onnx")
    shutil.copy(sidecar_path(onnx_path), tmp_path / "model.onnx.json")
    before = (tmp_path / "model.onnx.json").read_bytes()

    result = export_checkpoint(str(checkpoint), tmp_path / "model.pt2", fmt="torch-export")
    info = json.loads(result.sidecar_path.read_text())
    assert info["irpe"] == [spec] and info["outputs"][0]["shape"] == ["batch", TINY["num_queries"], 92]
    assert (info["format"], info["opset"], info["model_file"]) == ("torch-export", None, "model.pt2")
    check = info["checked_against_pytorch"]
    traced, checked = InputLimits.of(model).sample_sizes(model.backbone.stride)
    assert check["runtime"] == "torch.export.load" and check["input_shape"][2:] == list(checked) != list(traced)
    assert max(result.max_abs_diff.values()) <= 1e-4
    assert result.sidecar_path == tmp_path / "model.pt2.json"
    assert (tmp_path / "model.onnx.json").read_bytes() == before and not (tmp_path / "model.json").exists()
    assert OnnxDetector(tmp_path / "model.onnx").info["format"] == "onnx"
