"""HungarianMatcher: the cost it minimises, optimality, batching and images without targets."""
import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from detr_irpe.models import DegenerateBoxError, HungarianMatcher


def random_boxes(n, generator):
    """n valid normalised (cx, cy, w, h) boxes."""
    centre = torch.rand(n, 2, generator=generator) * 0.6 + 0.2
    size = torch.rand(n, 2, generator=generator) * 0.3 + 0.05
    return torch.cat([centre, size], dim=1)


def make_batch(num_targets, num_queries=4, num_classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    outputs = {
        "pred_logits": torch.randn(len(num_targets), num_queries, num_classes + 1, generator=g),
        "pred_boxes": torch.stack([random_boxes(num_queries, g) for _ in num_targets]),
    }
    targets = [{"labels": torch.randint(0, num_classes, (n,), generator=g), "boxes": random_boxes(n, g)}
               for n in num_targets]
    return outputs, targets


def giou_by_hand(a, b):
    """GIoU of two cxcywh boxes given as python floats."""
    ax1, ay1, ax2, ay2 = a[0] - a[2] / 2, a[1] - a[3] / 2, a[0] + a[2] / 2, a[1] + a[3] / 2
    bx1, by1, bx2, by2 = b[0] - b[2] / 2, b[1] - b[3] / 2, b[0] + b[2] / 2, b[1] + b[3] / 2
    inter = max(0.0, min(ax2, bx2) - max(ax1, bx1)) * max(0.0, min(ay2, by2) - max(ay1, by1))
    union = a[2] * a[3] + b[2] * b[3] - inter
    hull = (max(ax2, bx2) - min(ax1, bx1)) * (max(ay2, by2) - min(ay1, by1))
    return inter / union - (hull - union) / hull


def test_cost_matrix_is_detr_cost():
    outputs, targets = make_batch([2, 1])
    matcher = HungarianMatcher(cost_class=1.0, cost_bbox=5.0, cost_giou=2.0)
    cost = matcher.cost_matrix(outputs, targets)
    assert cost.shape == (2, 4, 3)
    all_targets = [(t["labels"][j], t["boxes"][j]) for t in targets for j in range(len(t["labels"]))]
    for b in range(2):
        prob = outputs["pred_logits"][b].softmax(-1)
        for q in range(4):
            pred = outputs["pred_boxes"][b, q]
            for col, (label, box) in enumerate(all_targets):
                expected = (-prob[q, label] + 5.0 * (pred - box).abs().sum()
                            - 2.0 * giou_by_hand(pred.tolist(), box.tolist()))
                assert cost[b, q, col].item() == pytest.approx(expected.item(), abs=1e-5)


def brute_force_min(cost):
    """Minimum total cost over all ways of giving each target (column) its own query (row)."""
    q, n = cost.shape
    if n > q:  # more targets than queries: choose which targets get one
        return min(brute_force_min(cost[:, list(cols)]) for cols in itertools.combinations(range(n), q))
    return min(sum(cost[r, c].item() for c, r in enumerate(rows)) for rows in itertools.permutations(range(q), n))


@settings(max_examples=40, deadline=None)
@given(num_targets=st.lists(st.integers(0, 5), min_size=1, max_size=3), seed=st.integers(0, 2**16))
def test_assignment_is_optimal(num_targets, seed):
    outputs, targets = make_batch(num_targets, num_queries=4, seed=seed)
    matcher = HungarianMatcher()
    cost = matcher.cost_matrix(outputs, targets)
    indices = matcher(outputs, targets)
    start = 0
    for b, ((rows, cols), n) in enumerate(zip(indices, num_targets)):
        block = cost[b, :, start:start + n]
        start += n
        assert len(rows) == len(cols) == min(4, n)
        assert len(set(rows.tolist())) == len(rows) and len(set(cols.tolist())) == len(cols)
        if n:
            assert block[rows, cols].sum().item() == pytest.approx(brute_force_min(block), abs=1e-4)


def test_batched_equals_per_image():
    outputs, targets = make_batch([3, 0, 5, 1], num_queries=6, seed=3)
    matcher = HungarianMatcher()
    batched = matcher(outputs, targets)
    for b, target in enumerate(targets):
        single = matcher({k: v[b:b + 1] for k, v in outputs.items()}, [target])[0]
        assert torch.equal(batched[b][0], single[0]) and torch.equal(batched[b][1], single[1])


def test_images_without_targets():
    outputs, targets = make_batch([0, 2, 0], seed=1)
    indices = HungarianMatcher()(outputs, targets)
    for (rows, cols), n in zip(indices, [0, 2, 0]):
        assert rows.dtype == cols.dtype == torch.int64
        assert len(rows) == len(cols) == n
    outputs, targets = make_batch([0, 0], seed=2)  # a batch with no target at all
    assert all(len(r) == len(c) == 0 for r, c in HungarianMatcher()(outputs, targets))


def test_prefers_the_right_class_and_box():
    # query 1 sits on the target with the right class, query 0 is far away with a wrong class
    outputs = {"pred_logits": torch.tensor([[[5.0, 0.0, 0.0], [0.0, 5.0, 0.0]]]),
               "pred_boxes": torch.tensor([[[0.2, 0.2, 0.1, 0.1], [0.7, 0.7, 0.2, 0.2]]])}
    targets = [{"labels": torch.tensor([1]), "boxes": torch.tensor([[0.7, 0.7, 0.2, 0.2]])}]
    rows, cols = HungarianMatcher()(outputs, targets)[0]
    assert rows.tolist() == [1] and cols.tolist() == [0]


def test_degenerate_boxes_are_reported():
    outputs, targets = make_batch([1, 2])
    targets[1]["boxes"][1, 3] = -0.1  # target of image 1, box 1: y2 < y1
    with pytest.raises(DegenerateBoxError, match=r"target box \(y2 < y1\) in image 1 of the batch, box 1"):
        HungarianMatcher()(outputs, targets)


def test_rejects_all_zero_costs_and_wrong_batch():
    with pytest.raises(ValueError, match="all matching costs are 0"):
        HungarianMatcher(0, 0, 0)
    outputs, targets = make_batch([1, 1])
    with pytest.raises(ValueError, match="1 target dicts for a batch of 2"):
        HungarianMatcher()(outputs, targets[:1])
