"""Gradient accumulation is exact: k micro-batches make the optimizer step of one batch of all their
images (every loss divided by the counts of the whole step, known from the targets before any
forward pass), W processes x B images that of one process with W x B (test_accumulate_ddp.py),
and the training loop counts optimizer steps (schedule, log, max_iters_per_epoch, SIGTERM)."""
import os
import signal

import pytest
import torch

from detr_irpe.config import ConfigError, load_config
from detr_irpe.engine.inference import load_detector
from detr_irpe.engine.optim import build_optimizer
from detr_irpe.engine.step import step_normalizers, train_step
from detr_irpe.engine.train import Trainer, TrainingStopped
from detr_irpe.models import build_detr
from detr_irpe.models.criterion import LossNormalizers
from detr_irpe.structures import pad_images as pad  # a list of (3, H, W) images -> padded batch, mask
from helpers import tiny_overrides

# A DETR with a frozen-statistics CNN (resnet18: FrozenBatchNorm2d, as DETR-R50) and iRPE, small.
SMALL = dict(backbone="resnet18", backbone_weights="none", hidden_dim=32, nheads=4, enc_layers=2, dec_layers=2,
             dim_feedforward=64, num_queries=5, num_classes=3, rpe="rpe-2.0-product-ctx-1-k")
REL = 1e-10
LR = 1e-3


@pytest.fixture(autouse=True)
def one_thread():
    """One thread: the numbers do not depend on it, and two cores shared with other work make
    two threads far slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def small_detr(seed=0, **options):
    torch.manual_seed(seed)
    model, criterion, _ = build_detr(**{**SMALL, "dropout": 0.0, **options})
    model.double().train()
    with torch.no_grad():  # iRPE tables start at zero, which would hide their gradients' mistakes
        for name, p in model.named_parameters():
            if "lookup_table" in name:
                p.normal_(0, 0.1)
    return model, criterion


def make_targets(counts, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [{"labels": torch.randint(0, SMALL["num_classes"], (n,), generator=g),
             "boxes": torch.cat([torch.rand(n, 2, generator=g) * 0.5 + 0.25,
                                 torch.rand(n, 2, generator=g) * 0.3 + 0.1], 1).double()} for n in counts]


def make_images(sizes, seed=2):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(3, h, w, generator=g, dtype=torch.float64) for h, w in sizes]


def close(got, want, what, floor=1e-30):
    """``got`` equals ``want`` to ``REL`` of ``want``'s largest magnitude (or of ``floor``, for a
    tensor that is zero but for rounding)."""
    scale = want.abs().max().item()
    assert (got - want).abs().max().item() <= REL * max(scale, floor), f"{what}: {got} vs {want}"


def one_step(batches, batched_backbone=True, **options):
    """A fresh model, AdamW, one train_step over ``batches``: (result, gradients, weights after)."""
    model, criterion = small_detr(**options)
    optimizer = build_optimizer(model, load_config(None, [f"train.lr={LR}", f"train.lr_backbone={LR}"]).train)
    result = train_step(model, criterion, optimizer, batches, clip_max_norm=0.1, batched_backbone=batched_backbone)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return result, grads, {n: p.detach().clone() for n, p in model.named_parameters()}


def check_same_step(big, micro):
    (r1, g1, w1), (r2, g2, w2) = big, micro
    close(torch.tensor(r2.loss), torch.tensor(r1.loss), "loss")
    for key in ("loss_ce", "loss_bbox", "loss_giou", "loss_ce_0", "loss_bbox_0", "loss_giou_0"):
        close(r2.losses[key], r1.losses[key], key)
    assert g1.keys() == g2.keys() and len(g1) > 50
    # a gradient that is zero in exact arithmetic (a bias before a group norm) is compared to 1e-6
    # of the largest gradient
    floor = 1e-6 * max(g.abs().max().item() for g in g1.values())
    for name in g1:
        close(g2[name], g1[name], f"gradient of {name}", floor)
    start = dict(small_detr(masks=any(n.startswith("mask_head") for n in w1))[0].named_parameters())
    moved = [n for n in w1 if not torch.equal(w1[n], start[n])]
    assert len(moved) > 50  # AdamW moved every trained weight
    for name in w1:  # to 1e-10 of the weights, or of AdamW's step (lr) for weights near zero
        close(w2[name], w1[name], f"{name} after AdamW", floor=LR)


def test_the_class_weight_sum_is_known_from_the_targets_alone():
    """The cross-entropy's weight sum (1 per matched query, eos_coef per other) from the targets
    equals the one the matcher's assignment gives: min(Q, N_i) matched queries per image and
    group, more targets than queries included."""
    _, criterion = small_detr()
    g = torch.Generator().manual_seed(0)
    for counts, groups in [((2, 0, 5), 1), ((7, 1), 1), ((3, 6, 0), 2)]:
        q = SMALL["num_queries"]
        outputs = {"pred_logits": torch.randn(len(counts), q * groups, 4, generator=g, dtype=torch.float64),
                   "pred_boxes": torch.rand(len(counts), q * groups, 4, generator=g, dtype=torch.float64) * 0.3 + 0.2}
        if groups > 1:
            outputs["query_groups"] = groups
        targets = make_targets(counts)
        indices = criterion.match_groups(outputs["pred_logits"], outputs["pred_boxes"], targets, groups)
        classes = torch.full((len(counts), q * groups), SMALL["num_classes"])
        for b, ((rows, cols), t) in enumerate(zip(indices, targets)):
            classes[b, rows] = t["labels"][cols]
        boxes, weight = criterion.batch_counts(targets, q, groups)
        assert boxes == sum(counts)
        assert weight == pytest.approx(criterion.empty_weight.double()[classes].sum().item(), rel=1e-14)
        # and the criterion given that sum computes the batch's own weighted mean
        own = criterion(outputs, targets)
        given = criterion(outputs, targets, LossNormalizers(max(boxes, 1.0), weight))
        assert given["loss_ce"].item() == pytest.approx(own["loss_ce"].item(), rel=1e-13)


def test_one_batch_in_one_process_keeps_the_criterions_own_normalisers():
    model, criterion = small_detr()
    batch = (torch.zeros(2, 3, 8, 8), torch.zeros(2, 8, 8, dtype=torch.bool), make_targets([1, 2]))
    assert step_normalizers(criterion, model, [batch]) is None  # DETR's computation, bit for bit
    both = step_normalizers(criterion, model, [batch, batch])
    assert both.num_boxes == 6 and both.class_weight == pytest.approx(2 * (3 + 0.1 * 7), rel=1e-7)


def test_four_micro_batches_of_one_image_equal_one_batch_of_four():
    images, targets = make_images([(96, 128)] * 4), make_targets([2, 0, 3, 1])
    big = one_step(pad(images) + (targets,))
    micro = one_step([pad([image]) + ([target],) for image, target in zip(images, targets)])
    check_same_step(big, micro)


def test_with_the_mask_head_four_micro_batches_of_one_image_equal_one_batch_of_four():
    """The mask losses share the box losses' normaliser (images of one size: the target masks are
    padded alike)."""
    images, targets = make_images([(64, 96)] * 4), make_targets([1, 2, 0, 1])
    g = torch.Generator().manual_seed(3)
    for t in targets:
        t["masks"] = (torch.rand(len(t["labels"]), 64, 96, generator=g) > 0.5).to(torch.uint8)
    big = one_step(pad(images) + (targets,), masks=True)
    micro = one_step([pad([image]) + ([target],) for image, target in zip(images, targets)], masks=True)
    check_same_step(big, micro)
    close(micro[0].losses["loss_mask"], big[0].losses["loss_mask"], "loss_mask")
    close(micro[0].losses["loss_dice"], big[0].losses["loss_dice"], "loss_dice")


def test_mixed_sizes_with_the_per_image_backbone_equal_one_batch():
    """With the CNN on each image unpadded (train.batched_backbone=false), padding reaches only
    masked keys, so micro-batches of one image equal the padded batch of all four."""
    sizes = [(96, 128), (128, 96), (64, 160), (96, 96)]
    images, targets = make_images(sizes), make_targets([1, 4, 0, 2])
    big = one_step(pad(images) + (targets,), batched_backbone=False)
    micro = one_step([pad(images[:2]) + (targets[:2],), pad(images[2:3]) + (targets[2:3],),
                      pad(images[3:]) + (targets[3:],)], batched_backbone=False)
    check_same_step(big, micro)


# --- the training loop counts optimizer steps ------------------------------------------------------

def run_cfg(out, **extra):
    """6 training images, batch 1 x accumulate 2: 3 optimizer steps per epoch."""
    values = {"train.epochs": 1, "train.eval_every": 0, "train.batch_size": 1, "train.accumulate": 2,
              "train.lr_schedule": "cosine", "train.warmup_iters": 2, "train.ema": "{decay: 0.9, warmup_steps: 2}",
              "train.activation_checkpointing": "[backbone, encoder, decoder]",
              "data.train_scales": "[64, 80]", "data.max_size": 96, "data.crop_resize": "[64]",
              "data.crop_min": 48, "data.crop_max": 64, "data.eval_size": 64}
    values.update(extra)
    return load_config(None, tiny_overrides(out, **values))


def forwards(model):
    calls = []
    handle = model.register_forward_hook(lambda *args: calls.append(1))
    return calls, handle


def test_the_loop_counts_optimizer_steps_and_a_sigterm_mid_step_resumes_exactly(tmp_path):
    straight = Trainer(run_cfg(tmp_path / "straight"), quiet=True)
    trained, _ = forwards(straight.model)
    validated, _ = forwards(straight.ema.module)
    assert straight.iters_per_epoch == 3
    straight.fit()
    assert len(trained) == 6  # 3 steps of 2 micro-batches
    assert len(validated) == 6  # the 6 validation images, by the EMA
    assert straight.global_step == 3 and straight.scheduler.last_epoch == 3  # the schedule counts steps
    assert straight.history[0]["train_iterations"] == 3
    assert straight.ema.updates == 3

    interrupted = Trainer(run_cfg(tmp_path / "split"), quiet=True)
    count = {"n": 0}

    def sigterm_on_third_forward(module, args, output):  # the first micro-batch of step 1
        count["n"] += 1
        if count["n"] == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    interrupted.model.register_forward_hook(sigterm_on_third_forward)
    with pytest.raises(TrainingStopped):
        interrupted.fit()
    assert count["n"] == 4  # the step under way finished: the checkpoint lies on a step boundary
    saved = torch.load(tmp_path / "split" / "checkpoint.pth", weights_only=True)
    assert saved["step_in_epoch"] == 2 and saved["global_step"] == 2 and saved["ema"]["updates"] == 2
    assert torch.equal(saved["training_weights"]["class_embed.weight"], interrupted.model.class_embed.weight)
    assert torch.equal(saved["model"]["class_embed.weight"], interrupted.ema.module.class_embed.weight)

    resumed = Trainer(run_cfg(tmp_path / "split"), resume=str(tmp_path / "split" / "checkpoint.pth"), quiet=True)
    assert (resumed.step_in_epoch, resumed.global_step, resumed.ema.updates) == (2, 2, 2)
    resumed.fit()
    for name, want in straight.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[name], want), name
    for name, want in straight.ema.module.state_dict().items():
        assert torch.equal(resumed.ema.module.state_dict()[name], want), f"EMA {name}"
    assert not torch.equal(straight.ema.module.class_embed.weight, straight.model.class_embed.weight)

    # what validation measured is what a checkpoint's model holds, and what inference loads
    for name in ("checkpoint.pth", "checkpoint_best.pth"):
        loaded = load_detector(str(tmp_path / "straight" / name)).model.state_dict()
        for key, want in straight.ema.module.state_dict().items():
            assert torch.equal(loaded[key], want), f"{name}: {key}"
    # without train.ema a resume continues from the trained weights (the average is dropped)
    plain = Trainer(run_cfg(tmp_path / "split", **{"train.ema": "null"}),
                    resume=str(tmp_path / "split" / "checkpoint_epoch0000.pth"), quiet=True)
    assert plain.ema is None
    for name, want in resumed.model.state_dict().items():
        assert torch.equal(plain.model.state_dict()[name], want), name


def test_max_iters_per_epoch_counts_steps_and_a_resume_needs_the_same_images_per_step(tmp_path):
    trainer = Trainer(run_cfg(tmp_path / "a", **{"train.max_iters_per_epoch": 1, "train.epochs": 2,
                                                  "train.ema": "null", "train.eval_every": 0}), quiet=True)
    assert trainer.iters_per_epoch == 1
    stats = trainer.train_one_epoch(_no_stop())
    assert stats["iterations"] == 1 and trainer.global_step == 1
    trainer.save()
    with pytest.raises(ConfigError, match=r"same product, not 1 x 3"):
        Trainer(run_cfg(tmp_path / "a", **{"train.accumulate": 3, "train.ema": "null"}),
                resume=str(tmp_path / "a" / "checkpoint.pth"), quiet=True)
    with pytest.raises(ConfigError, match=r"accumulate=7 needs 7 batches"):
        Trainer(run_cfg(tmp_path / "b", **{"train.accumulate": 7}), quiet=True)


class _no_stop:
    def agreed(self, device):
        return False
