"""Panoptic segmentation end to end on the synthetic panoptic data: demo --panoptic (train, PQ),
eval of a panoptic checkpoint (PQ from the written files equals PQ from the loop), predict's
panoptic pictures, check-data on a panoptic config, the shipped panoptic configs."""
import functools
import json

import numpy as np
import pytest
import torch

from detr_irpe.apps.cli import main
from detr_irpe.apps.demo import DemoSettings, build_demo_config, draw_panoptic_pictures, run_demo
from detr_irpe.config import ConfigError, load_config
from detr_irpe.data import build_dataset
from detr_irpe.engine.evaluate_panoptic import evaluate_panoptic_model
from detr_irpe.engine.inference import load_detector
from detr_irpe.evaluation import evaluate_panoptic
from detr_irpe.visualize.boxes import class_color
from detr_irpe.visualize.panoptic import draw_panoptic

TINY = ["train.batch_size=4", "train.device=cpu", "model.hidden_dim=32", "model.dim_feedforward=64",
        "model.enc_layers=1", "model.dec_layers=1", "train.warmup_iters=1", "data.train_scales=[48]",
        "data.eval_size=48", "data.max_size=48"]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("panoptic_demo")
    settings = DemoSettings(output_dir=str(root / "run"), data_root=str(root / "data"), num_train=8, num_val=3,
                            image_size=48, pictures=False, max_iterations=1, max_pretrain_iterations=1,
                            panoptic=True, quiet=True, overrides=TINY)
    return root, run_demo(settings)


def test_demo_panoptic_smoke_trains_and_reports_pq(demo_run):
    root, summary = demo_run
    masks = root / "run" / "masks"
    metrics = json.loads((masks / "metrics.json").read_text())
    for key in ("PQ", "SQ", "RQ", "PQ_th", "PQ_st"):
        assert 0.0 <= metrics[key] <= 1.0 and summary["masks"][key] == metrics[key]
    assert metrics["panoptic"]["Things"]["n"] + metrics["panoptic"]["Stuff"]["n"] == metrics["panoptic"]["All"]["n"]
    assert set(metrics["PQ_per_class"]) == {"square", "circle", "triangle", "cross", "star", "sky", "grass", "sand"}
    assert (root / "data_panoptic" / "annotations" / "panoptic_val.json").is_file()
    predictions = json.loads((masks / "panoptic_predictions.json").read_text())
    assert sorted(a["image_id"] for a in predictions["annotations"]) == [1, 2, 3]
    assert all((masks / "panoptic_predictions" / a["file_name"]).is_file() for a in predictions["annotations"])
    assert summary["masks"]["iterations"] == 1


def test_the_panoptic_demo_has_its_own_detector_schedule_under_the_users_overrides():
    cfg = build_demo_config(DemoSettings(panoptic=True))
    assert (cfg.model.num_queries, cfg.train.pretrain_iterations, cfg.train.epochs) == (24, 600, 12)
    assert build_demo_config(DemoSettings(panoptic=True, overrides=["model.num_queries=30"])).model.num_queries == 30
    assert build_demo_config(DemoSettings()).model.num_queries == 12  # the detection demo keeps demo.yaml's


def test_pq_of_the_written_predictions_equals_the_evaluation_loops(demo_run, tmp_path):
    root, _ = demo_run
    detector = load_detector(str(root / "run" / "masks" / "checkpoint.pth"))
    dataset = build_dataset(detector.config.data, "val", masks=True)
    # threshold 0: every query keeps its most likely class, so the untrained model predicts segments
    metrics = evaluate_panoptic_model(detector.model, None, dataset, torch.device("cpu"), output_dir=tmp_path,
                                      quiet=True, threshold=0.0)
    data = root / "data_panoptic"
    result = evaluate_panoptic(data / "annotations" / "panoptic_val.json", data / "panoptic_val",
                               tmp_path / "panoptic_predictions.json", tmp_path / "panoptic_predictions")
    assert result["All"]["pq"] == metrics["PQ"] and result["Stuff"]["sq"] == metrics["SQ_st"]
    assert {str(c): v for c, v in result["per_class"].items()} == metrics["panoptic"]["per_class"]
    predictions = json.loads((tmp_path / "panoptic_predictions.json").read_text())
    assert sum(len(a["segments_info"]) for a in predictions["annotations"]) > 0


def test_eval_and_predict_commands_on_a_panoptic_checkpoint(demo_run, tmp_path, capsys):
    root, summary = demo_run
    checkpoint = str(root / "run" / "masks" / "checkpoint.pth")
    assert main(["eval", "--checkpoint", checkpoint, "--output-dir", str(tmp_path / "eval")]) == 0
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["PQ"] == summary["masks"]["PQ"]
    assert (tmp_path / "eval" / "panoptic_predictions.json").is_file()
    assert main(["eval", "--checkpoint", checkpoint, "--output-dir", str(tmp_path / "eval")]) == 1
    assert "--overwrite" in capsys.readouterr().err  # an earlier evaluation is not replaced unasked
    image = root / "data_panoptic" / "val" / "000000.jpg"
    assert main(["predict", "--checkpoint", checkpoint, "--out", str(tmp_path / "pred"), str(image),
                 "--threshold", "0"]) == 0
    entry = json.loads((tmp_path / "pred" / "detections.json").read_text())[0]
    assert entry["picture"].endswith("000000.png") and (tmp_path / "pred" / "panoptic" / "000000.png").is_file()
    assert entry["detections"] and {"id", "category_id", "isthing", "area", "name"} <= set(entry["detections"][0])
    assert sum(s["area"] for s in entry["detections"]) == 48 * 48
    (tmp_path / "pred" / "000000.png").unlink()  # the picture and detections.json gone, the panoptic PNG kept
    (tmp_path / "pred" / "detections.json").unlink()
    kept = (tmp_path / "pred" / "panoptic" / "000000.png").read_bytes()
    capsys.readouterr()
    assert main(["predict", "--checkpoint", checkpoint, "--out", str(tmp_path / "pred"), str(image)]) == 1
    assert "panoptic/000000.png" in capsys.readouterr().err
    assert (tmp_path / "pred" / "panoptic" / "000000.png").read_bytes() == kept
    # the demo's pictures of a panoptic run: the same drawing, on the first validation images
    cfg = load_detector(checkpoint).config
    drawn = draw_panoptic_pictures(root / "run" / "masks" / "checkpoint.pth", cfg, tmp_path / "demo_pictures", 2, "cpu")
    assert [p.rsplit("/", 1)[1] for p in drawn] == ["000000.png", "000001.png"]


def test_draw_panoptic_colours_each_segment_and_names_its_classes():
    image = torch.zeros(3, 40, 30, dtype=torch.uint8)
    ids = torch.zeros(40, 30, dtype=torch.long)
    ids[:20] = 3
    ids[20:, :15] = 7
    segments = [{"id": 3, "category_id": 6, "isthing": False}, {"id": 7, "category_id": 2, "isthing": True}]
    drawn = draw_panoptic(image, ids, segments, {6: "sky", 2: "circle"}, alpha=1.0)
    assert drawn.shape[0] == 3 and drawn.shape[1] == 40 and drawn.shape[2] > 30  # the legend on the right
    assert tuple(drawn[:, 5, 5].tolist()) == class_color(6) and tuple(drawn[:, 30, 5].tolist()) == class_color(2)
    assert drawn[:, 30, 25].tolist() == [0, 0, 0]  # id 0 is no listed segment: left as it is
    assert drawn[:, 19, 5].tolist() == [255, 255, 255] or drawn[:, 20, 5].tolist() == [255, 255, 255]  # border
    legend = drawn[:, :, 30:].numpy()
    assert np.any(np.all(legend.transpose(1, 2, 0) == class_color(6), axis=-1))
    with pytest.raises(ValueError, match="same size"):
        draw_panoptic(image, ids[:10], segments)


def test_check_data_on_a_panoptic_config_checks_the_pngs(demo_run, tmp_path, capsys):
    root, _ = demo_run
    config = root / "run" / "masks" / "config.yaml"
    assert main(["check-data", "--config", str(config), "--no-images"]) == 0
    (root / "data_panoptic" / "panoptic_val" / "000002.png").rename(tmp_path / "moved.png")
    try:
        assert main(["check-data", "--config", str(config), "--split", "val", "--no-images"]) == 1
        out = capsys.readouterr().out
        assert "1 panoptic PNG missing" in out and "000002.png (image 3)" in out
    finally:
        (tmp_path / "moved.png").rename(root / "data_panoptic" / "panoptic_val" / "000002.png")


def test_shipped_panoptic_configs_and_a_bad_dataset_name():
    for name, rpe in (("detr_r50_panoptic", None), ("detr_r50_panoptic_irpe_product_ctx_k_9x9", "rpe-2.0-product-ctx-1-k")):
        cfg = load_config(name)
        assert cfg.data.dataset == "coco_panoptic" and cfg.model.masks and cfg.model.num_classes == 250
        assert cfg.model.rpe == rpe and cfg.train.frozen_weights
    with pytest.raises(ConfigError, match="data.dataset must be one of coco, coco_panoptic"):
        load_config(None, ["data.dataset=panoptic"])


def test_a_transformers_panoptic_folder_loads_as_a_panoptic_model_with_the_same_outputs(tmp_path):
    from transformers import DetrConfig, DetrForSegmentation, DetrImageProcessor

    from detr_irpe.engine.convert import convert_checkpoint
    from detr_irpe.engine.evaluate_panoptic import is_panoptic
    from detr_irpe.interop import read_processor_format
    from detr_irpe.models import PostProcessPanoptic
    from test_interop_hf import randomise_
    from test_segmentation_apps import HF_BACKBONES, HF_SEG, assert_same, run_hf, run_ours

    theirs = DetrForSegmentation(DetrConfig(**HF_SEG, **HF_BACKBONES["native"])).eval()
    randomise_(theirs, seed=5)
    theirs.save_pretrained(tmp_path / "hf")
    DetrImageProcessor(format="coco_panoptic", size={"shortest_edge": 96, "longest_edge": 144}).save_pretrained(
        tmp_path / "hf")
    detector = load_detector(str(tmp_path / "hf"))
    cfg = detector.config
    assert is_panoptic(cfg) and cfg.data.val_annotations == "annotations/panoptic_val2017.json"
    assert (cfg.data.eval_size, cfg.data.max_size) == (96, 144)
    images = torch.randn(2, 3, 96, 128, generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(2, 96, 128, dtype=torch.bool)
    mask[1, :, 100:] = True
    images[1, :, :, 100:] = 0
    ours, hf = run_ours(detector.model, (images, mask)), run_hf(theirs, (images, mask))
    assert_same(ours, hf)
    postprocess = PostProcessPanoptic({0: True, 1: True, 2: False, 3: False}, threshold=0.0)
    sizes = torch.tensor([[96, 128], [96, 100]])
    for a, b in zip(postprocess(ours, sizes), postprocess(hf, sizes)):
        assert torch.equal(a["ids"], b["ids"]) and a["segments_info"] == b["segments_info"]
    back = convert_checkpoint(tmp_path / "hf", tmp_path / "back", "hf", hf_backbone="native")
    assert read_processor_format(back) == "coco_panoptic" and read_processor_format(tmp_path / "hf") == "coco_panoptic"


def _pq_on_rank(checkpoint, rank):
    """PQ of the demo's mask model over its val split (3 images + 1 repeated: 2 per process), in a
    process group of 2 (see test_pq_under_ddp_counts_each_image_once)."""
    detector = load_detector(checkpoint)
    dataset = build_dataset(detector.config.data, "val", masks=True)
    assert len(dataset) == 3  # an odd count: the loader repeats one image to even the shards
    return evaluate_panoptic_model(detector.model, None, dataset, torch.device("cpu"), batch_size=1,
                                   quiet=True, threshold=0.0)


def test_pq_under_ddp_counts_each_image_once(demo_run, tmp_path):
    from helpers import spawn_gloo

    root, _ = demo_run
    pq_on_rank = functools.partial(_pq_on_rank, str(root / "run" / "masks" / "checkpoint.pth"))
    ranks = spawn_gloo(pq_on_rank, tmp_path)
    alone = pq_on_rank(0)
    assert ranks[0] == ranks[1] == alone
    gt = json.loads((root / "data_panoptic" / "annotations" / "panoptic_val.json").read_text())["annotations"][:3]
    found = sum(c["tp"] + c["fn"] for c in alone["PQ_counts"].values())
    assert found == sum(len(a["segments_info"]) for a in gt)  # every ground-truth segment once
