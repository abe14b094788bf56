"""Instance segmentation wherever a user meets it: predict's pictures and detections.json,
Detector.predict, ONNX / torch.export with pred_masks, Hugging Face DetrForSegmentation folders both
ways (against transformers itself), check-data --masks, the synthetic shapes' masks and demo --masks.

The model is the tests' tiny one with a mask head (hidden_dim 32, 4 heads: its group norms take 4
groups where DETR's 8 do not divide the channels), except for transformers, whose
DetrForSegmentation needs DETR's 8 groups (hidden_dim 128, 8 heads) and a ResNet.
"""
import hashlib
import json

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from transformers import DetrConfig, DetrForSegmentation, ResNetConfig

from detr_irpe import Detector
from detr_irpe.apps.demo import MASK_STAGE, DemoSettings, build_demo_config, cap_schedule, mask_stage_config, run_demo
from detr_irpe.apps.pictures import draw_boxes
from detr_irpe.apps.predict import predict_onnx, predict_path
from detr_irpe.config import DataConfig, load_config
from detr_irpe.data import CocoDetection, collate_fn, make_eval_transforms
from detr_irpe.data import synthetic
from detr_irpe.data.images import read_rgb
from detr_irpe.data.transforms import model_input_transform
from detr_irpe.engine.checkpoint import load_checkpoint_file
from detr_irpe.engine.convert import convert_checkpoint
from detr_irpe.engine.inference import load_detector
from detr_irpe.errors import CheckpointError, UsageError
from detr_irpe.export import OnnxDetector, export_checkpoint, onnx_session, read_sidecar, run_onnx
from detr_irpe.export.program import sample_inputs
from detr_irpe.interop import read_hf_config, read_safetensors_weights
from detr_irpe.models import PostProcess, build_detr
from detr_irpe.visualize import class_color, draw_detections
from helpers import COCO, save_tiny_checkpoint, tool
from test_interop_hf import randomise_

IMAGES = sorted((COCO / "val2017").glob("*.jpg"))[:2]
NEW_SIZES = [(3, 64, 160), (2, 113, 70), (3, 150, 97)]  # (batch, height, width), none used to export
ATOL = 1e-4  # logits and boxes, as the detection exports and the transformers comparisons
MASK_ATOL = 1e-3  # mask logits (measured: 4e-6)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: a second thread saves little and costs its waits."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def seg_checkpoint(tmp_path_factory):
    """Our checkpoint of the tiny model with a mask head (random weights), its data the COCO test images."""
    return save_tiny_checkpoint(tmp_path_factory.mktemp("seg") / "seg.pth", model_options={"masks": True})


def decode(rle) -> torch.Tensor:
    return torch.from_numpy(mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode()})).bool()


def stacked(records, key):
    return torch.stack([torch.as_tensor(r[key]) for r in records])


# -- Detector.predict, predict, pictures ------------------------------------------------------------


def test_detector_predict_gives_the_postprocessors_masks_as_tensors_or_rle(seg_checkpoint, tiny_checkpoint):
    detector = Detector.from_checkpoint(seg_checkpoint, device="cpu")
    assert detector.has_masks
    image = read_rgb(IMAGES[0])
    records = detector.predict(image, threshold=0.0)[0]
    # the reference: the model on the image alone, then the post-processor, by hand
    loaded = detector.loaded
    with torch.no_grad():
        outputs = loaded.model([model_input_transform(loaded.config.data)(image)], batched_backbone=False)
    reference = PostProcess()(outputs, torch.tensor([list(image.shape[-2:])]))[0]
    order = reference["scores"].argsort(descending=True)
    assert len(records) == len(order) == 5
    for record, query in zip(records, order.tolist()):
        assert record["mask"].dtype == torch.bool and record["mask"].shape == image.shape[-2:]
        assert torch.equal(record["mask"], reference["masks"][query]) and record["score"] == float(reference["scores"][query])
    assert any(0 < int(r["mask"].sum()) < r["mask"].numel() for r in records)  # masks that say something
    rle = detector.predict(image, threshold=0.0, masks="rle")[0]
    assert all(torch.equal(decode(a["mask"]), b["mask"]) and a["mask"]["size"] == list(image.shape[-2:])
               for a, b in zip(rle, records))
    json.dumps(rle)  # ready for JSON
    with pytest.raises(UsageError, match="masks must be one of 'tensor', 'rle'"):
        detector.predict(image, masks="bitmap")
    assert not Detector.from_checkpoint(tiny_checkpoint, device="cpu").has_masks
    assert all("mask" not in r for r in Detector.from_checkpoint(tiny_checkpoint, device="cpu").predict(image, 0.0)[0])


def test_predict_draws_the_masks_under_the_boxes_and_writes_them_as_rle(seg_checkpoint, tmp_path):
    predict_path(str(seg_checkpoint), IMAGES, tmp_path / "out", threshold=0.0, device="cpu")
    written = json.loads((tmp_path / "out" / "detections.json").read_text())
    detector = Detector.from_checkpoint(seg_checkpoint, device="cpu")
    for entry, path in zip(written, IMAGES):
        want = detector.predict(path, threshold=0.0)[0]
        got = entry["detections"]
        assert len(got) == len(want) == 5
        masks = torch.stack([decode(r["mask"]) for r in got])
        assert all(r["mask"]["size"] == [entry["height"], entry["width"]] for r in got)
        assert torch.equal(masks, stacked(want, "mask"))
        image = read_rgb(path)
        boxes, labels, scores = stacked(got, "box"), stacked(got, "label"), stacked(got, "score")
        picture = torch.from_numpy(np.array(Image.open(entry["picture"]))).permute(2, 0, 1)
        assert torch.equal(picture, draw_detections(image, boxes, labels, scores, detector.categories, masks=masks))
        assert not torch.equal(picture, draw_detections(image, boxes, labels, scores, detector.categories))


def test_draw_detections_fills_each_mask_in_its_class_colour_at_half_opacity():
    image = torch.full((3, 20, 30), 100, dtype=torch.uint8)
    masks = torch.zeros(1, 20, 30, dtype=torch.bool)
    masks[0, 12:18, 2:8] = True  # away from the box and its label
    drawn = draw_detections(image, torch.tensor([[15.0, 2.0, 28.0, 10.0]]), torch.tensor([2]), masks=masks)
    colour = torch.tensor(class_color(2), dtype=torch.float)
    assert torch.allclose(drawn[:, 14, 4].float(), 0.5 * colour + 50, atol=1)
    assert torch.equal(drawn[:, 14, 12], image[:, 14, 12])
    with pytest.raises(ValueError, match="masks must be"):
        draw_detections(image, torch.tensor([[15.0, 2.0, 28.0, 10.0]]), torch.tensor([2]), masks=masks[:, :10])


def test_visualize_boxes_of_a_segmentation_model_draws_predicted_and_ground_truth_masks(seg_checkpoint, tmp_path):
    written = draw_boxes(str(seg_checkpoint), tmp_path / "viz", val=1, threshold=0.0, device="cpu")
    assert len(written) == 1 and written[0].is_file()


# -- export -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def seg_export(seg_checkpoint, tmp_path_factory):
    """The segmentation model exported once to ONNX (checked by the exporter on its own padded batch)."""
    out = tmp_path_factory.mktemp("seg_export")
    return export_checkpoint(str(seg_checkpoint), out / "seg.onnx")


def test_onnx_and_torch_export_with_masks_equal_pytorch_on_new_padded_sizes(seg_checkpoint, seg_export):
    result = seg_export
    model = load_detector(str(seg_checkpoint)).model
    session = onnx_session(result.model_path)
    program = result.program.module()  # the torch.export program the ONNX model was converted from
    for seed, (batch, height, width) in enumerate(NEW_SIZES):
        images, mask = sample_inputs(batch, (height, width), seed=seed)
        with torch.no_grad():
            want = model(images, mask)
            from_program = dict(zip(("pred_logits", "pred_boxes", "pred_masks"), program(images, mask)))
        from_onnx = run_onnx(session, images, mask)
        assert set(from_onnx) == {"pred_logits", "pred_boxes", "pred_masks"}
        assert from_onnx["pred_masks"].shape == (batch, 5, -(-height // 4), -(-width // 4))
        for got in (from_onnx, from_program):
            diffs = {k: float((got[k] - want[k]).abs().max()) for k in got}
            assert diffs["pred_logits"] < ATOL and diffs["pred_boxes"] < ATOL and diffs["pred_masks"] < MASK_ATOL, diffs
    info = read_sidecar(result.sidecar_path)
    assert [o["name"] for o in info["outputs"]] == ["pred_logits", "pred_boxes", "pred_masks"]
    assert set(info["checked_against_pytorch"]["max_abs_diff"]) == {"pred_logits", "pred_boxes", "pred_masks"}
    assert "sigmoid > 0.5" in info["postprocess_masks"]


def test_onnx_detector_and_predict_onnx_give_the_masks_of_the_checkpoint(seg_checkpoint, seg_export, tmp_path):
    """The export's masks come from logits within 1e-5 of PyTorch's: thresholded at 0.5 they agree on
    every pixel but those whose probability lies within that of 0.5 (none here; at most 1 in 1000 allowed)."""
    result = seg_export
    onnx = OnnxDetector(result.model_path)
    assert onnx.has_masks
    detector = Detector.from_checkpoint(seg_checkpoint, device="cpu")
    predict_onnx(result.model_path, IMAGES, tmp_path / "out", threshold=0.0)
    written = json.loads((tmp_path / "out" / "detections.json").read_text())
    for path, entry in zip(IMAGES, written):
        want = detector.predict(path, threshold=0.0)[0]
        got = onnx.predict(path, threshold=0.0)[0]
        assert [r["label"] for r in got] == [r["label"] for r in want]
        assert float((stacked(got, "score") - stacked(want, "score")).abs().max()) < ATOL
        agree = (stacked(got, "mask") == stacked(want, "mask")).float().mean()
        assert agree >= 0.999, float(agree)
        assert torch.equal(torch.stack([decode(r["mask"]) for r in entry["detections"]]), stacked(got, "mask"))


# -- Hugging Face transformers ----------------------------------------------------------------------

HF_SEG = dict(d_model=128, encoder_layers=1, decoder_layers=1, encoder_attention_heads=8, decoder_attention_heads=8,
              encoder_ffn_dim=64, decoder_ffn_dim=64, num_queries=5, use_pretrained_backbone=False,
              id2label={0: "N/A", 1: "person", 2: "bicycle", 3: "car"})
STAGES = ["stage1", "stage2", "stage3", "stage4"]
HF_BACKBONES = {
    "native": dict(use_timm_backbone=False, backbone_config=ResNetConfig(
        layer_type="basic", depths=[2, 2, 2, 2], hidden_sizes=[64, 128, 256, 512], out_features=STAGES)),
    "timm": dict(use_timm_backbone=True, backbone="resnet18", position_embedding_type="learned"),
}


@pytest.fixture(scope="module")
def batch():
    """Two COCO val images after resizing (96 x 129 and 144 x 96), padded: ``(images, mask)``."""
    dataset = CocoDetection(COCO / "val2017", COCO / "annotations" / "instances_val2017.json",
                            make_eval_transforms(DataConfig(eval_size=96, max_size=144)))
    images, mask, _ = collate_fn([dataset[0], dataset[1]])
    return images, mask


def run_hf(model, batch):
    images, mask = batch
    with torch.no_grad():
        out = model(pixel_values=images, pixel_mask=(~mask).long())  # transformers: 1 on real pixels
    return {"pred_logits": out.logits, "pred_boxes": out.pred_boxes, "pred_masks": out.pred_masks}


def run_ours(model, batch):
    with torch.no_grad():
        out = model(*batch)  # the padded batch, as DETR (and transformers) run the mask head
    return {k: out[k] for k in ("pred_logits", "pred_boxes", "pred_masks")}


def assert_same(ours, theirs):
    diffs = {k: float((ours[k] - theirs[k]).abs().max()) for k in theirs}
    assert diffs["pred_logits"] < ATOL and diffs["pred_boxes"] < ATOL and diffs["pred_masks"] < ATOL, diffs
    assert theirs["pred_masks"].std() > 0.1  # masks that vary: a wrong tensor shows


@pytest.mark.parametrize("kind", list(HF_BACKBONES))
def test_transformers_detr_for_segmentation_loads_with_the_same_outputs_and_goes_back_unchanged(kind, batch, tmp_path):
    theirs = DetrForSegmentation(DetrConfig(**HF_SEG, **HF_BACKBONES[kind])).eval()
    randomise_(theirs, seed=3)
    theirs.save_pretrained(tmp_path / "hf")
    detector = load_detector(str(tmp_path / "hf"))
    assert detector.config.model.masks and (detector.config.model.hidden_dim, detector.config.model.num_classes) == (128, 4)
    assert_same(run_ours(detector.model, batch), run_hf(theirs, batch))
    # a swapped pair of same-shaped head tensors (what a wrong key mapping does) would not pass
    with torch.no_grad():
        head = detector.model.mask_head
        head.gn3.weight.copy_(head.gn3.weight.flip(0))
    with pytest.raises(AssertionError):
        assert_same(run_ours(detector.model, batch), run_hf(theirs, batch))
    # transformers 5's own module names (a state dict saved by hand) read the same
    (tmp_path / "hand").mkdir()
    (tmp_path / "hand" / "config.json").write_text((tmp_path / "hf" / "config.json").read_text())
    torch.save(theirs.state_dict(), tmp_path / "hand" / "pytorch_model.bin")
    got, reference = load_checkpoint_file(tmp_path / "hand")["model"], load_checkpoint_file(tmp_path / "hf")["model"]
    assert got.keys() == reference.keys() and all(torch.equal(got[k], reference[k]) for k in got)
    # and back: the same tensors under the same keys
    back = convert_checkpoint(tmp_path / "hf", tmp_path / "back", "hf", hf_backbone=kind)
    before, after = read_safetensors_weights(tmp_path / "hf" / "model.safetensors"), read_safetensors_weights(back / "model.safetensors")
    assert sorted(after) == sorted(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert read_hf_config(back)["architectures"] == ["DetrForSegmentation"]


def test_our_segmentation_model_converted_to_hf_runs_the_same_in_transformers(batch, tmp_path, capsys):
    cfg = load_config(None, ["model.backbone=resnet18", "model.backbone_weights=none", "model.hidden_dim=128",
                             "model.nheads=8", "model.enc_layers=1", "model.dec_layers=2", "model.dim_feedforward=64",
                             "model.num_queries=4", "model.num_classes=5", "model.masks=true"])
    torch.manual_seed(5)
    ours, _, _ = build_detr(cfg.model)
    randomise_(ours, seed=5)
    torch.save({"model": ours.state_dict(), "config": cfg.to_dict(), "categories": {1: "person", 3: "car"}},
               tmp_path / "seg.pth")
    assert tool("convert_checkpoint").main(["--to", "hf", str(tmp_path / "seg.pth"), str(tmp_path / "hf")]) == 0
    config = read_hf_config(tmp_path / "hf")
    assert config["architectures"] == ["DetrForSegmentation"] and config["backbone_config"]["out_features"] == STAGES
    theirs, info = DetrForSegmentation.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not any(info.values()), info  # nothing missing, unexpected or mismatched
    assert_same(run_ours(ours.eval(), batch), run_hf(theirs.eval(), batch))


def test_a_mask_head_transformers_cannot_build_is_refused_for_transformers(tmp_path):
    cfg = load_config(None, ["model.backbone=resnet18", "model.backbone_weights=none", "model.hidden_dim=64",
                             "model.nheads=4", "model.num_classes=5", "model.masks=true"])
    with torch.device("meta"):
        model, _, _ = build_detr(cfg.model)
    torch.save({"model": {k: torch.zeros(v.shape) for k, v in model.state_dict().items()}, "config": cfg.to_dict()},
               tmp_path / "narrow.pth")
    with pytest.raises(CheckpointError, match=r"mask head has group norms of fewer than 8 groups \(channels \[68, 32"):
        convert_checkpoint(tmp_path / "narrow.pth", tmp_path / "hf", "hf")


# -- check-data --masks -----------------------------------------------------------------------------


def test_check_data_masks_and_train_check_data_name_a_malformed_segmentation(tmp_path, capsys):
    (tmp_path / "images").mkdir()
    Image.new("RGB", (50, 40)).save(tmp_path / "images" / "a.png")
    annotations = [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 19, 19], "segmentation": [[1, 1, 20, 1, 20, 20]]},
                   {"id": 2, "image_id": 1, "category_id": 1, "bbox": [1, 1, 10, 10], "segmentation": [[1, 2, 3, 4]]}]
    data = {"images": [{"id": 1, "file_name": "a.png", "height": 40, "width": 50}], "annotations": annotations,
            "categories": [{"id": 1, "name": "x"}]}
    (tmp_path / "ann.json").write_text(json.dumps(data))
    check = tool("check_data").main
    assert check(["--annotations", str(tmp_path / "ann.json"), "--images", str(tmp_path / "images")]) == 0
    capsys.readouterr()
    assert check(["--annotations", str(tmp_path / "ann.json"), "--images", str(tmp_path / "images"), "--masks"]) == 1
    out = capsys.readouterr().out
    assert "annotation 2 (image 1)" in out and "a polygon of 4 coordinates" in out
    data_keys = [f"data.root={tmp_path}", "data.train_images=images", "data.train_annotations=ann.json",
                 "data.val_images=images", "data.val_annotations=ann.json"]
    assert check(["--config", "detr_r50", "model.masks=true", *data_keys]) == 1  # the config asks for masks
    assert "a polygon of 4 coordinates" in capsys.readouterr().out
    assert tool("train").main(["--check-data", "--config", "detr_r50", "model.masks=true", *data_keys]) == 1
    assert "a polygon of 4 coordinates" in capsys.readouterr().out
    assert tool("train").main(["--check-data", "--config", "detr_r50", *data_keys]) == 0


# -- the synthetic shapes and the demo ------------------------------------------------------------


def test_synthetic_shapes_carry_their_exact_masks_and_keep_images_and_boxes_as_before(tmp_path):
    root = tmp_path / "shapes"
    synthetic.ensure_synthetic_dataset(root, 6, 2, 48, 0, max_objects=4)
    data = json.loads((root / "annotations" / "instances_train.json").read_text())
    for ann in data["annotations"]:
        mask = decode(ann["segmentation"])
        ys, xs = mask.nonzero(as_tuple=True)
        x0, y0, x1, y1 = int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
        assert ann["bbox"] == [x0, y0, x1 - x0, y1 - y0] and ann["area"] == int(mask.sum())
    assert json.loads((root / "manifest.json").read_text())["version"] == 2
    # what generator version 1 drew, pixel for pixel, with its boxes (before the masks were added)
    digest = hashlib.sha256()
    for index in range(8):
        image, objects = synthetic.draw_image(np.random.default_rng([0, 0, index]), 64, synthetic.SHAPES, 6)
        for obj in objects:
            obj.pop("segmentation")
        digest.update(np.asarray(image).tobytes())
        digest.update(json.dumps(objects, sort_keys=True).encode())
    assert digest.hexdigest() == "1595cf75ca32ab4c96b03b7a031c38bc982242cab720f05445bcfa0b30b31688"


def test_the_mask_stage_schedule_is_fixed_at_half_the_detectors():
    settings = DemoSettings(masks=True)
    cfg = mask_stage_config(build_demo_config(settings), "outputs/demo/checkpoint.pth", "outputs/demo/masks")
    iterations = cap_schedule(cfg, settings.num_train // cfg.train.batch_size, settings.max_iterations)
    assert iterations == 1500 <= 0.5 * 3000
    assert cfg.model.masks and cfg.model.query_groups == 1 and cfg.train.frozen_weights == "outputs/demo/checkpoint.pth"
    assert cfg.train.max_minutes is None and cfg.train.pretrain_iterations == 0 and MASK_STAGE["train.epochs"] == 3


def test_demo_masks_smoke(tmp_path, capsys):
    settings = DemoSettings(
        output_dir=str(tmp_path / "run"), data_root=str(tmp_path / "data"), num_train=16, num_val=4, image_size=64,
        num_pictures=1, max_iterations=2, max_pretrain_iterations=2, masks=True, quiet=True,
        overrides=["train.batch_size=4", "train.device=cpu", "model.hidden_dim=32", "model.dim_feedforward=64",
                   "model.enc_layers=1", "model.dec_layers=1", "train.warmup_iters=1"],
    )
    summary = run_demo(settings)
    out, masks = tmp_path / "run", tmp_path / "run" / "masks"
    for name in ("checkpoint.pth", "metrics.json", "segm_detections.json", "log.jsonl", "config.yaml"):
        assert (masks / name).is_file(), name
    m = summary["masks"]
    assert m["iterations"] == 2 and m["detector"] == str(out / "checkpoint.pth")
    metrics = json.loads((masks / "metrics.json").read_text())
    assert {"segm_AP", "segm_AP50", "segm_AP75"} <= set(metrics) and m["segm_AP50"] == metrics["segm_AP50"]
    assert json.loads((out / "demo_summary.json").read_text())["masks"]["paths"]["checkpoint"] == str(masks / "checkpoint.pth")
    assert len(m["paths"]["pictures"]["boxes"]) == 1 and all(p.endswith(".png") for p in m["paths"]["pictures"]["boxes"])
    # only the head trained: the detector in the mask model is the demo's detector, tensor for tensor
    detector = torch.load(out / "checkpoint.pth", weights_only=True)["model"]
    segm = torch.load(masks / "checkpoint.pth", weights_only=True)["model"]
    assert all(torch.equal(segm["detr." + k], v) for k, v in detector.items() if not k.startswith("group_query_embed"))
    # --detector freezes an existing checkpoint and trains only the head; without --masks it is refused
    demo = tool("demo").main
    assert demo(["--detector", str(out / "checkpoint.pth"), "--output-dir", str(tmp_path / "x")]) == 1
    assert "add --masks" in capsys.readouterr().err
