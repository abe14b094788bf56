"""tools/train.py, --resume, tools/eval.py, tools/predict.py and torchrun, on the real COCO images in tests/data.

The tools run in this interpreter (a new one costs seconds of imports), but for torchrun's two
processes; training without deterministic algorithms, a process-wide switch (torchrun's run sets it)."""
import json

import pytest
import torch

from detr_irpe.engine.checkpoint import load_checkpoint_file
from helpers import COCO, run_tool, tiny_overrides, tool
from detr_irpe.evaluation import METRIC_NAMES
from detr_irpe.models import detr_weight_dict


def check_tensorboard_events(folder):
    """The event file, read back by tensorboard's own reader, holds every loss term and the lr per
    logged iteration, the 12 COCO numbers and the validation pictures."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"images": 0, "scalars": 0}).Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"train/loss", "train/loss_ce", "train/loss_bbox", "train/loss_giou", "train/loss_ce_0",
            "train/class_error", "lr/transformer", "lr/backbone"} <= scalars
    assert {f"val/{name}" for name in METRIC_NAMES} <= scalars
    assert len(events.Scalars("train/loss_ce")) >= 2  # log_every=1: one point per iteration
    images = [tag for tag in events.Tags()["images"] if tag.startswith("val_images/")]
    assert len(images) == 2
    assert {tag for tag in events.Tags()["images"] if tag.startswith("eval/")}  # the pictures of the AP
    picture = events.Images(images[0])[0]
    assert picture.width > picture.height > 0  # prediction | ground truth, side by side


def test_train_resume_eval_predict(tmp_path, capsys):
    out = tmp_path / "run"
    assert tool("train").main(tiny_overrides(out, **{
        "train.epochs": 1, "train.tensorboard": "true", "eval.pictures": "true", "train.tensorboard_images": 2,
        "train.save_safetensors": "true", "train.deterministic": "false"})) == 0
    assert "epoch 0 |" in capsys.readouterr().out
    check_tensorboard_events(out / "tensorboard")
    weights = load_checkpoint_file(out / "checkpoint.safetensors")  # beside each .pth: the model, config, names
    saved = torch.load(out / "checkpoint.pth", weights_only=True)
    assert weights["config"] == saved["config"] and weights["model"].keys() == saved["model"].keys()
    assert all(torch.equal(weights["model"][k], v) for k, v in saved["model"].items())
    assert (out / "checkpoint_epoch0000.safetensors").is_file()  # named after the epoch logged as 0
    ckpt = torch.load(out / "checkpoint.pth", weights_only=True)
    assert ckpt["epoch"] == 1 and set(ckpt) >= {"model", "optimizer", "lr_scheduler", "config", "rng"}

    # continue to epoch 2 with a new learning rate: it wins over the saved one, and says so
    assert tool("train").main(["--resume", str(out / "checkpoint.pth"),
                               *tiny_overrides(out, **{"train.lr": 5e-4, "train.deterministic": "false"})]) == 0
    second = capsys.readouterr().out
    assert "resumed from" in second and "epoch 1" in second
    assert "train.lr=0.0005 overrides the checkpoint's 0.001" in second
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [0, 1]
    resumed = torch.load(out / "checkpoint.pth", weights_only=True)
    assert resumed["epoch"] == 2
    # lr_drop=1: epoch 1 ran at the new lr / 10
    assert resumed["optimizer"]["param_groups"][0]["lr"] == pytest.approx(5e-6)
    assert (out / "metrics.json").is_file() and (out / "detections.json").is_file()

    ev = tmp_path / "eval"
    assert tool("eval").main(["--checkpoint", str(out / "checkpoint.pth"), "--data-root", str(COCO),
                              "--output-dir", str(ev)]) == 0
    metrics = json.loads((ev / "metrics.json").read_text())
    assert set(METRIC_NAMES) <= set(metrics)
    detections = json.loads((ev / "detections.json").read_text())
    assert {d["image_id"] for d in detections} <= {int(p.stem) for p in (COCO / "val2017").glob("*.jpg")}

    pred = tmp_path / "pred"
    assert tool("predict").main(["--checkpoint", str(out / "checkpoint.pth"), str(COCO / "val2017"), "--out",
                                 str(pred), "--threshold", "0.0"]) == 0
    pngs = sorted(pred.glob("*.png"))
    assert len(pngs) == 6 and all(p.stat().st_size > 1000 for p in pngs)
    results = json.loads((pred / "detections.json").read_text())
    assert len(results) == 6 and all(len(r["detections"]) == 6 for r in results)  # 6 queries, threshold 0


def test_torchrun_two_processes_match_single_process(tmp_path):
    """Two gloo processes train + evaluate to the end; their merged detections equal one process's."""
    out = tmp_path / "ddp"
    overrides = tiny_overrides(out, **{"train.epochs": 1, "train.batch_size": 1})
    proc = run_tool(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                     "tools/train.py"], *overrides, timeout=400)
    assert proc.stdout.count("epoch 0 |") == 1 and proc.stdout.count("resumed") == 0  # one voice: rank 0's
    # every logged number is the mean over both processes, so the total is the weighted sum of the logged terms
    record = json.loads((out / "log.jsonl").read_text().splitlines()[0])
    weights = detr_weight_dict(1.0, 5.0, 2.0, num_aux=1)  # tiny_overrides: 2 decoder layers, default weights
    assert record["train_loss"] == pytest.approx(sum(w * record[f"train_{k}"] for k, w in weights.items()), rel=1e-5)
    merged = json.loads((out / "detections.json").read_text())
    single_dir = tmp_path / "single"
    assert tool("eval").main(["--checkpoint", str(out / "checkpoint.pth"), "--output-dir", str(single_dir),
                              "--batch-size", "1"]) == 0
    single = json.loads((single_dir / "detections.json").read_text())

    def key(d):
        return (d["image_id"], d["category_id"], round(d["score"], 4), [round(v, 2) for v in d["bbox"]])

    assert len(merged) == len(single) == 6 * 6  # every val image once, 6 queries each
    assert sorted(map(key, merged)) == sorted(map(key, single))
    assert json.loads((out / "metrics.json").read_text())["AP"] == json.loads(
        (single_dir / "metrics.json").read_text())["AP"]
