"""What two gloo processes share, checked in one process group (one spawn for all, since each
process costs an interpreter and a torch import): the box-loss normaliser averaged over
processes, the data sharded between them, and detections gathered from both before COCO
evaluation. Training end to end under torchrun is in test_engine_cli.py."""
import pytest
import torch

from detr_irpe.config import DataConfig
from detr_irpe.data import build_dataloader, build_dataset, load_coco, set_epoch
from detr_irpe.evaluation import CocoEvaluator
from detr_irpe.models import HungarianMatcher
from helpers import spawn_gloo
from test_criterion import make_criterion, one_image_example
from test_data import COCO_ROOT, dataset
from test_evaluation import VAL_JSON, gt_predictions

WORLD = 2


def num_boxes_check(rank: int) -> dict:
    """Rank 0 sees 3 target boxes, rank 1 sees 1: each normalises its L1 loss by the mean, 2."""
    outputs, targets = one_image_example()
    if rank == 0:
        targets = [{"labels": torch.tensor([0, 1, 1]),
                    "boxes": torch.tensor([[0.6, 0.55, 0.2, 0.2], [0.2, 0.2, 0.1, 0.1], [0.8, 0.8, 0.1, 0.1]])}]
    losses = make_criterion()(outputs, targets)
    rows, cols = HungarianMatcher()(outputs, targets)[0]
    l1 = (outputs["pred_boxes"][0, rows] - targets[0]["boxes"][cols]).abs().sum()
    return {"loss_bbox": losses["loss_bbox"].item(), "expected": l1.item() / 2}


def sharding_check() -> dict:
    cfg = DataConfig(root=str(COCO_ROOT), eval_size=64, max_size=100, train_scales=[64], crop_resize=[])
    val = build_dataloader(build_dataset(cfg, "val"), batch_size=2, train=False)
    train = build_dataloader(build_dataset(cfg, "train"), batch_size=1, train=True)
    orders = []
    for epoch in range(2):
        set_epoch(train, epoch)
        orders.append([int(t["image_id"]) for _, _, ts in train for t in ts])
    return {"val": [int(t["image_id"]) for _, _, ts in val for t in ts], "train": orders}


def gather_check(rank: int) -> dict:
    coco = load_coco(VAL_JSON)
    ids = sorted(coco.imgs)
    shard = (ids + ids[:1])[rank::WORLD]  # like DistributedSampler: interleaved, the last shard padded
    evaluator = CocoEvaluator(coco)
    evaluator.update(gt_predictions(coco, shard))
    evaluator.synchronize()
    if rank != 0:
        return {}
    return {"ids": evaluator.image_ids, "AP": evaluator.summarize(verbose=False)["AP"], "n": len(evaluator.results())}


def checks(rank: int) -> dict:
    return {"num_boxes": num_boxes_check(rank), "sharding": sharding_check(), "gather": gather_check(rank)}


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return spawn_gloo(checks, tmp_path_factory.mktemp("ddp"), WORLD)


def test_num_boxes_is_averaged_over_processes(ranks):
    for result in ranks:
        assert result["num_boxes"]["loss_bbox"] == pytest.approx(result["num_boxes"]["expected"], rel=1e-6)


def test_dataloader_shards_under_ddp(ranks):
    r0, r1 = (r["sharding"] for r in ranks)
    assert sorted(r0["val"] + r1["val"]) == dataset("val").ids  # 6 images, 3 per process
    assert set(r0["train"][0]).isdisjoint(r1["train"][0]) and len(r0["train"][0]) == 3
    assert r0["train"][0] != r0["train"][1] or r1["train"][0] != r1["train"][1]  # reshuffled per epoch


def test_detections_gathered_across_processes(ranks):
    coco_gt = load_coco(VAL_JSON)
    result = ranks[0]["gather"]
    n_gt = sum(1 for a in coco_gt.dataset["annotations"] if not a["iscrowd"])
    assert result["ids"] == sorted(coco_gt.imgs) and result["n"] == n_gt
    assert result["AP"] == pytest.approx(1.0)
