"""Group DETR (``model.query_groups``): extra groups of queries in training, hidden from each other
and matched one group at a time; inference runs the first group only, so the model is DETR."""
import pytest
import torch

from detr_irpe.engine.checkpoint import load_for_finetuning
from detr_irpe.engine.inference import inference_state_dict
from detr_irpe.models import build_detr
from detr_irpe.models.detr import group_mask
from helpers import TINY, tiny_model

GROUPS = 3


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    images = [torch.randn(3, 64, 80, generator=g), torch.randn(3, 48, 64, generator=g)]
    targets = [{"labels": torch.tensor([1, 3]), "boxes": torch.tensor([[0.3, 0.4, 0.2, 0.3], [0.7, 0.6, 0.3, 0.2]])},
               {"labels": torch.tensor([2]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]])}]
    return images, targets


def grouped(seed=0):
    model = tiny_model(seed=seed, query_groups=GROUPS, dropout=0.0)
    _, criterion, _ = build_detr(**{**TINY, "rpe": "rpe-2.0-product-ctx-1-k", "query_groups": GROUPS})
    return model, criterion


def test_one_group_is_detr():
    plain = tiny_model()
    assert not hasattr(plain, "group_query_embed") and "query_groups" not in plain.train()(batch()[0])
    model, _ = grouped()
    assert model.group_query_embed.weight.shape == ((GROUPS - 1) * TINY["num_queries"], TINY["hidden_dim"])
    assert set(model.state_dict()) - set(plain.state_dict()) == {"group_query_embed.weight"}


def test_training_outputs_every_group_and_inference_the_first():
    model, _ = grouped()
    images, _ = batch()
    out = model.train()(images)
    assert out["query_groups"] == GROUPS and out["pred_logits"].shape[1] == GROUPS * TINY["num_queries"]
    assert all(a["pred_boxes"].shape[1] == GROUPS * TINY["num_queries"] for a in out["aux_outputs"])
    # in eval the model is the DETR that holds its weights without the extra groups
    plain = tiny_model(dropout=0.0)
    plain.load_state_dict(inference_state_dict(model.state_dict()))
    got, want = model.eval()(images), plain.eval()(images)
    assert "query_groups" not in got
    torch.testing.assert_close(got["pred_logits"], want["pred_logits"], rtol=0, atol=0)
    torch.testing.assert_close(got["pred_boxes"], want["pred_boxes"], rtol=0, atol=0)
    # in training (no dropout; batch norm on batch statistics in both) group 0 is DETR's queries
    trained = plain.train()(images)["pred_logits"]
    torch.testing.assert_close(out["pred_logits"][:, : TINY["num_queries"]], trained, rtol=1e-5, atol=1e-6)


def test_groups_cannot_see_each_other():
    model, _ = grouped()
    images, _ = batch()
    q = TINY["num_queries"]
    before = model.train()(images)["pred_logits"]
    with torch.no_grad():
        model.group_query_embed.weight[q:] += 5.0  # the third group only
    after = model(images)["pred_logits"]
    torch.testing.assert_close(after[:, : 2 * q], before[:, : 2 * q], rtol=1e-6, atol=1e-6)
    assert not torch.allclose(after[:, 2 * q:], before[:, 2 * q:])
    mask = group_mask(2, 3)
    assert mask.tolist() == [[row // 2 != col // 2 for col in range(6)] for row in range(6)]


def test_each_group_is_matched_alone_and_losses_are_their_mean():
    model, criterion = grouped()
    images, targets = batch()
    out = model.train()(images)
    losses = criterion(out, targets)
    q = TINY["num_queries"]

    def group(outputs, g):
        return {"pred_logits": outputs["pred_logits"][:, g * q:(g + 1) * q],
                "pred_boxes": outputs["pred_boxes"][:, g * q:(g + 1) * q]}

    singles = []
    for g in range(GROUPS):
        one = {**group(out, g), "aux_outputs": [group(a, g) for a in out["aux_outputs"]]}
        singles.append(criterion(one, targets))
    for key in ("loss_ce", "loss_bbox", "loss_giou", "loss_ce_0", "loss_bbox_0", "loss_giou_0"):
        mean = sum(s[key] for s in singles) / GROUPS
        torch.testing.assert_close(losses[key], mean, rtol=1e-5, atol=1e-6, msg=key)
    # the matching: every target once per group, each query index inside its own group
    indices = criterion.match_groups(out["pred_logits"], out["pred_boxes"], targets, GROUPS)
    for (rows, cols), target in zip(indices, targets):
        assert sorted(cols.tolist()) == sorted(list(range(len(target["labels"]))) * GROUPS)
        assert sorted((rows // q).tolist()) == sorted(list(range(GROUPS)) * len(target["labels"]))
    loss = criterion.weighted_loss(losses)
    loss.backward()
    assert model.group_query_embed.weight.grad.abs().sum() > 0


def test_fine_tuning_adds_or_drops_the_extra_groups():
    plain = tiny_model()
    model, _ = grouped(seed=1)
    fresh = model.group_query_embed.weight.detach().clone()
    report = load_for_finetuning(model, plain.state_dict())
    assert report.initialised == ["group_query_embed.weight"]
    assert torch.equal(model.group_query_embed.weight, fresh)  # a fresh init, not zeros
    assert torch.equal(model.query_embed.weight, plain.query_embed.weight)
    back = tiny_model(seed=2)
    report = load_for_finetuning(back, model.state_dict())
    assert report.unexpected == ["group_query_embed.weight"]
    assert torch.equal(back.query_embed.weight, plain.query_embed.weight)


def test_bad_group_count_is_a_config_error():
    with pytest.raises(ValueError, match="model.query_groups must be >= 1"):
        build_detr(**TINY, query_groups=0)
