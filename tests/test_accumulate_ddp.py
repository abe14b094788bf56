"""W processes x B images make the optimizer step of one process with W x B (every loss, with
``train.loss_normalization=global``), with or without micro-batches, and DDP
synchronises gradients once per step. Two gloo processes, one spawn for every check."""
import pytest
import torch
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

from detr_irpe.config import load_config
from detr_irpe.engine.optim import build_optimizer
from detr_irpe.engine.step import train_step
from helpers import spawn_gloo
from test_accumulate import check_same_step, make_images, make_targets, one_step, pad, small_detr

WORLD = 2
SIZES = [(96, 128)] * 4
COUNTS = [3, 1, 0, 1]  # 4 boxes on rank 0, 1 on rank 1: their weighted means weigh differently


def ddp_step(rank, micro, normalization="global"):
    """One DDP step of this rank's images (2 of the 4), as ``micro`` micro-batches; returns the
    result, gradients, weights and how many gradient all-reduces ran."""
    model, criterion = small_detr()
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    reduces = {"n": 0}

    def counting_hook(state, bucket):
        reduces["n"] += 1
        return default_hooks.allreduce_hook(None, bucket)

    ddp.register_comm_hook(None, counting_hook)
    optimizer = build_optimizer(model, load_config(None, ["train.lr=1e-3", "train.lr_backbone=1e-3"]).train)
    images, targets = make_images(SIZES)[2 * rank: 2 * rank + 2], make_targets(COUNTS)[2 * rank: 2 * rank + 2]
    batches = [pad(images) + (targets,)] if micro == 1 else [pad([i]) + ([t],) for i, t in zip(images, targets)]
    result = train_step(ddp, criterion, optimizer, batches, clip_max_norm=0.1, normalization=normalization)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return result, grads, {n: p.detach().clone() for n, p in model.named_parameters()}, reduces["n"]


def steps(rank: int) -> dict:
    results = {}
    for name, micro, normalization in [("one", 1, "global"), ("micro", 2, "global"), ("official", 1, "official")]:
        result, grads, weights, reduces = ddp_step(rank, micro, normalization)
        results[name] = {"loss": result.loss, "losses": result.losses, "grads": grads, "weights": weights,
                         "reduces": reduces}
    return results


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return spawn_gloo(steps, tmp_path_factory.mktemp("ddp_accumulate"), WORLD)


@pytest.fixture(scope="module")
def single():
    """One process, the 4 images in one batch."""
    torch.set_num_threads(1)
    return one_step(pad(make_images(SIZES)) + (make_targets(COUNTS),))


class _Result:
    def __init__(self, loss, losses):
        self.loss, self.losses = loss, losses


def as_step(ranks, name):
    """The processes' step as one: the loss terms averaged over processes (as logged), the
    gradients and weights of rank 0 (DDP made them the same on both)."""
    r0, r1 = ranks[0][name], ranks[1][name]
    for key in r0["weights"]:
        assert torch.equal(r0["weights"][key], r1["weights"][key]), key
    losses = {k: (r0["losses"][k] + r1["losses"][k]) / 2 for k in r0["losses"]}
    return _Result((r0["loss"] + r1["loss"]) / 2, losses), r0["grads"], r0["weights"]


@pytest.mark.parametrize("name", ["one", "micro"])
def test_two_processes_of_two_images_equal_one_process_of_four(ranks, single, name):
    check_same_step(single, as_step(ranks, name))


def test_gradients_are_synchronised_once_per_step(ranks):
    for rank in ranks:
        assert rank["micro"]["reduces"] == rank["one"]["reduces"] > 0  # no_sync on the first micro-batch


def test_official_normalisation_keeps_detrs_per_process_classification_mean(ranks, single):
    """DETR's own: each process's cross-entropy is the weighted mean over its images, so the step
    differs from one process's (the box losses are the same: their normaliser is global)."""
    step, grads, _ = as_step(ranks, "official")
    (want, want_grads, _) = single
    assert step.losses["loss_bbox"].item() == pytest.approx(want.losses["loss_bbox"].item(), rel=1e-12)
    assert step.losses["loss_ce"].item() != pytest.approx(want.losses["loss_ce"].item(), rel=1e-6)
    _, criterion = small_detr()
    model, _ = small_detr()
    for rank, result in enumerate(ranks):  # each process's own weighted mean, DETR's computation
        images = make_images(SIZES)[2 * rank: 2 * rank + 2]
        own = criterion(model(*pad(images)), make_targets(COUNTS)[2 * rank: 2 * rank + 2])
        assert result["official"]["losses"]["loss_ce"].item() == pytest.approx(own["loss_ce"].item(), rel=1e-12)
