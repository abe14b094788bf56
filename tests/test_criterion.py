"""SetCriterion: each loss against hand-computed values, auxiliary losses, fp32, gradients, errors."""
import math

import pytest
import torch

from detr_irpe.models import DegenerateBoxError, HungarianMatcher, SetCriterion, build_detr, detr_weight_dict

NUM_CLASSES = 2


def make_criterion(num_aux=0, eos_coef=0.1):
    return SetCriterion(NUM_CLASSES, HungarianMatcher(), detr_weight_dict(1.0, 5.0, 2.0, num_aux), eos_coef)


def one_image_example():
    """Two queries, one target; query 0 is the obvious match."""
    outputs = {"pred_logits": torch.tensor([[[2.0, 0.5, 0.1], [0.2, 0.3, 1.5]]]),
               "pred_boxes": torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.2, 0.2, 0.1, 0.1]]])}
    targets = [{"labels": torch.tensor([0]), "boxes": torch.tensor([[0.6, 0.55, 0.2, 0.2]])}]
    return outputs, targets


def test_losses_match_hand_computation():
    outputs, targets = one_image_example()
    losses = make_criterion()(outputs, targets)

    def log_softmax(logits, k):
        return logits[k] - math.log(sum(math.exp(v) for v in logits))

    # query 0 -> class 0 (weight 1), query 1 -> "no object" (weight eos_coef 0.1); weighted mean
    ce = (-log_softmax([2.0, 0.5, 0.1], 0) - 0.1 * log_softmax([0.2, 0.3, 1.5], 2)) / 1.1
    assert losses["loss_ce"].item() == pytest.approx(ce, rel=1e-6)
    # |0.5-0.6| + |0.5-0.55| + 0 + 0, over one target box
    assert losses["loss_bbox"].item() == pytest.approx(0.15, rel=1e-6)
    # boxes (0.4,0.4,0.6,0.6) and (0.5,0.45,0.7,0.65): intersection 0.015, union 0.065, hull 0.075
    giou = 0.015 / 0.065 - (0.075 - 0.065) / 0.075
    assert losses["loss_giou"].item() == pytest.approx(1 - giou, rel=1e-5)
    assert losses["cardinality_error"].item() == 0.0  # one object predicted, one expected
    assert losses["class_error"].item() == 0.0
    assert set(losses) == {"loss_ce", "loss_bbox", "loss_giou", "cardinality_error", "class_error"}


def test_box_losses_are_normalised_by_the_number_of_targets():
    g = torch.Generator().manual_seed(0)
    outputs = {"pred_logits": torch.randn(2, 5, NUM_CLASSES + 1, generator=g),
               "pred_boxes": torch.rand(2, 5, 4, generator=g) * 0.4 + 0.1}
    targets = [{"labels": torch.tensor([0, 1]), "boxes": torch.rand(2, 4, generator=g) * 0.4 + 0.1},
               {"labels": torch.tensor([1]), "boxes": torch.rand(1, 4, generator=g) * 0.4 + 0.1}]
    criterion = make_criterion()
    indices = criterion.matcher(outputs, targets)
    l1 = sum((outputs["pred_boxes"][b, rows] - t["boxes"][cols]).abs().sum()
             for b, ((rows, cols), t) in enumerate(zip(indices, targets)))
    losses = criterion(outputs, targets)
    assert losses["loss_bbox"].item() == pytest.approx(l1.item() / 3, rel=1e-6)
    # cardinality: |#non-"no object" argmaxes - #targets| averaged over images
    predicted = (outputs["pred_logits"].argmax(-1) != NUM_CLASSES).sum(1).float()
    expected = (predicted - torch.tensor([2.0, 1.0])).abs().mean()
    assert losses["cardinality_error"].item() == pytest.approx(expected.item())


def test_no_targets_gives_zero_box_losses():
    outputs, _ = one_image_example()
    losses = make_criterion()(outputs, [{"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}])
    assert losses["loss_bbox"].item() == 0 and losses["loss_giou"].item() == 0
    no_object = -torch.log_softmax(outputs["pred_logits"][0], -1)[:, -1].mean()
    assert losses["loss_ce"].item() == pytest.approx(no_object.item(), rel=1e-6)
    assert losses["class_error"].item() == 0


def test_aux_losses_and_weighted_total():
    outputs, targets = one_image_example()
    aux = [{"pred_logits": outputs["pred_logits"] * 0.5, "pred_boxes": outputs["pred_boxes"].flip(1)},
           {"pred_logits": -outputs["pred_logits"], "pred_boxes": outputs["pred_boxes"]}]
    criterion = make_criterion(num_aux=2)
    losses = criterion({**outputs, "aux_outputs": aux}, targets)
    for i, layer in enumerate(aux):
        alone = criterion(layer, targets)
        for key in ("loss_ce", "loss_bbox", "loss_giou", "cardinality_error"):
            assert losses[f"{key}_{i}"].item() == pytest.approx(alone[key].item())
    assert "class_error_0" not in losses
    assert criterion.weight_dict == {"loss_ce": 1.0, "loss_bbox": 5.0, "loss_giou": 2.0,
                                     "loss_ce_0": 1.0, "loss_bbox_0": 5.0, "loss_giou_0": 2.0,
                                     "loss_ce_1": 1.0, "loss_bbox_1": 5.0, "loss_giou_1": 2.0}
    total = sum(losses[k] * w for k, w in criterion.weight_dict.items())
    assert criterion.weighted_loss(losses).item() == pytest.approx(total.item())


def test_empty_weight_buffer():
    criterion = make_criterion(eos_coef=0.25)
    assert criterion.empty_weight.tolist() == [1.0, 1.0, 0.25]
    assert "empty_weight" in dict(criterion.named_buffers())


def test_losses_are_float32_under_autocast():
    outputs, targets = one_image_example()
    low = {k: v.bfloat16() for k, v in outputs.items()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = make_criterion()(low, targets)
    reference = make_criterion()({k: v.float() for k, v in low.items()}, targets)
    for key, value in losses.items():
        assert value.dtype == torch.float32, key
        assert value.item() == pytest.approx(reference[key].item(), rel=1e-6)


def test_a_float64_model_keeps_float64_losses():
    """Only lower precisions are raised to float32: a float64 loss equals the float64 computation,
    which a float32 one would miss by far more than 1e-12."""
    outputs, targets = one_image_example()
    double = {k: v.double() for k, v in outputs.items()}
    nudged = {k: v.clone() for k, v in double.items()}
    nudged["pred_boxes"][0, 0, 0] += 1e-12  # moves loss_bbox by 1e-12: invisible in float32
    losses, moved = make_criterion()(double, targets), make_criterion()(nudged, targets)
    for key in ("loss_ce", "loss_bbox", "loss_giou"):
        assert losses[key].dtype == torch.float64, key
    assert moved["loss_bbox"] - losses["loss_bbox"] == pytest.approx(-1e-12, rel=1e-3)


def test_gradients_reach_every_trainable_parameter():
    torch.manual_seed(0)
    model, criterion, _ = build_detr(backbone="resnet18", backbone_weights="none", hidden_dim=32, nheads=4,
                                     enc_layers=1, dec_layers=2, dim_feedforward=64, num_queries=6,
                                     num_classes=NUM_CLASSES, rpe="rpe-2.0-product-ctx-1-k")
    images = [torch.randn(3, 96, 64), torch.randn(3, 64, 96)]
    targets = [{"labels": torch.tensor([0, 1]), "boxes": torch.tensor([[0.3, 0.4, 0.2, 0.3], [0.7, 0.6, 0.3, 0.2]])},
               {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]])}]
    criterion.weighted_loss(criterion(model(images), targets)).backward()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen and all(n.startswith(("backbone.0.body.conv1", "backbone.0.body.layer1")) for n in frozen)
    assert not [n for n, p in trainable.items() if p.grad is None]
    # The decoder input is all zeros, so at initialisation the first decoder self-attention sees
    # identical values (v = in_proj_bias = 0): its projections and norm1's scale get exactly 0.
    structurally_zero = {"transformer.decoder.layers.0.self_attn.in_proj_weight",
                         "transformer.decoder.layers.0.self_attn.out_proj.weight",
                         "transformer.decoder.layers.0.norm1.weight"}
    assert {n for n, p in trainable.items() if not p.grad.abs().sum() > 0} == structurally_zero
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


def test_degenerate_prediction_box_error():
    outputs, targets = one_image_example()
    batch = {k: torch.cat([v, v]) for k, v in outputs.items()}
    batch["pred_boxes"][1, 1] = torch.tensor([0.5, 0.5, float("nan"), 0.1])
    with pytest.raises(DegenerateBoxError) as info:
        make_criterion()(batch, targets * 2)
    message = str(info.value)
    assert "degenerate prediction box (non-finite value) in image 1 of the batch, box 1" in message
    assert "(cx, cy, w, h) = (0.5, 0.5, nan, 0.1)" in message
    assert info.value.source == "prediction" and info.value.image_index == 1 and info.value.box_index == 1
    assert isinstance(info.value, ValueError)


def test_degenerate_target_box_error():
    outputs, targets = one_image_example()
    targets = targets + [{"labels": torch.tensor([0, 1]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2],
                                                                                  [0.3, 0.3, -0.2, 0.1]])}]
    batch = {k: torch.cat([v, v]) for k, v in outputs.items()}
    with pytest.raises(DegenerateBoxError) as info:
        make_criterion()(batch, targets)
    message = str(info.value)
    assert "degenerate target box (x2 < x1) in image 1 of the batch, box 1" in message
    assert "(cx, cy, w, h) = (0.3, 0.3, -0.2, 0.1)" in message
    assert "(x1, y1, x2, y2) = (0.4, 0.25, 0.2, 0.35)" in message
    assert "annotations" in message


def test_out_of_range_labels_are_reported():
    outputs, targets = one_image_example()
    targets[0]["labels"] = torch.tensor([NUM_CLASSES])
    with pytest.raises(ValueError, match=r"labels of image 0 in the batch are \[2\].*\[0, 2\)"):
        make_criterion()(outputs, targets)
