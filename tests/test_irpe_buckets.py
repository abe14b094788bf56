"""Bucket ids against loops over pairs of positions, bucket counts, translation invariance."""
import random

import pytest
import torch

from detr_irpe.irpe import BucketCache, RPEConfig, bucket_ids_2d, num_buckets, piecewise_index
from irpe_reference import bucket_matrix_ref, g_ref, num_buckets_ref

RATIOS = [1.9, 2.0, 2.5, 3.0]
TABLE_METHODS = ["euc", "quant", "product", "cross_rows", "cross_cols"]


@pytest.mark.parametrize("ratio", RATIOS)
def test_piecewise_index_matches_reference(ratio):
    xs = torch.arange(-300, 301)
    got = piecewise_index(xs, ratio, 2 * ratio, 8 * ratio)
    want = torch.tensor([g_ref(int(x), ratio) for x in xs])
    assert torch.equal(got, want)
    assert got.dtype == torch.long
    assert got.abs().max() == int(2 * ratio)


def test_piecewise_index_float_input_and_known_values():
    # ratio 2: alpha=2, beta=4, gamma=16; g(3) = round(2 + ln1.5/ln8 * 2) = 2, g(4) = 3, g(10) = 4
    x = torch.tensor([0.0, 1.4, 1.6, 2.0, 3.0, 4.0, 8.0, 10.0, 16.0, 1e6, -3.0, -10.0])
    got = piecewise_index(x, 2.0, 4.0, 16.0)
    assert got.tolist() == [0, 1, 2, 2, 2, 3, 3, 4, 4, 4, -2, -4]


@pytest.mark.parametrize("method", TABLE_METHODS)
@pytest.mark.parametrize("ratio", [1.9, 2.0])
@pytest.mark.parametrize("hw", [(5, 7), (4, 4), (1, 9)])
def test_bucket_ids_match_pairwise_loops(method, ratio, hw):
    ids, n = bucket_ids_2d(method, hw[0], hw[1], ratio)
    assert torch.equal(ids, bucket_matrix_ref(method, hw[0], hw[1], ratio))
    assert n == num_buckets_ref(method if method == "product" else "euc", ratio)


def test_bucket_ids_large_grid_far_offsets():
    # offsets up to 39 reach the logarithmic and clipped parts of g
    ids, _ = bucket_ids_2d("product", 2, 40, 2.0)
    assert torch.equal(ids, bucket_matrix_ref("product", 2, 40, 2.0))
    ids, _ = bucket_ids_2d("euc", 12, 12, 2.5)
    assert torch.equal(ids, bucket_matrix_ref("euc", 12, 12, 2.5))
    ids, _ = bucket_ids_2d("quant", 9, 9, 3.0)
    assert torch.equal(ids, bucket_matrix_ref("quant", 9, 9, 3.0))


@pytest.mark.parametrize("method", TABLE_METHODS)
def test_skip_tokens_get_one_extra_bucket(method):
    ids, n = bucket_ids_2d(method, 3, 4, 2.0, skip=2)
    base = num_buckets_ref("product" if method == "product" else "euc", 2.0)
    assert n == base + 1
    assert ids.shape == (14, 14)
    assert (ids[:2] == base).all() and (ids[:, :2] == base).all()
    assert (ids[2:, 2:] < base).all()
    assert torch.equal(ids, bucket_matrix_ref(method, 3, 4, 2.0, skip=2))


@pytest.mark.parametrize("ratio,product_buckets", [(1.9, 49), (2.0, 81), (2.5, 121), (3.0, 169)])
@pytest.mark.parametrize("method", ["euc", "quant", "cross", "product"])
def test_bucket_counts(ratio, product_buckets, method):
    expected = product_buckets if method == "product" else 2 * int(2 * ratio) + 1
    assert num_buckets(method, 2 * ratio) == expected
    assert RPEConfig(ratio=ratio, method=method).num_buckets == expected
    assert RPEConfig(ratio=ratio, method=method, skip=1).num_buckets == expected + 1
    # every id a large grid produces fits in the table; product and cross use all of them
    table_methods = ["cross_rows", "cross_cols"] if method == "cross" else [method]
    for tm in table_methods:
        ids, n = bucket_ids_2d(tm, 40, 40, ratio)
        assert n == expected
        assert ids.min() >= 0 and ids.max() < expected
        if method in ("product", "cross"):
            assert ids.unique().numel() == expected


@pytest.mark.parametrize("method", TABLE_METHODS)
def test_translation_invariance(method):
    """The bucket depends only on p_i - p_j: shifting both positions keeps it."""
    H, W = 9, 11
    ids, _ = bucket_ids_2d(method, H, W, 2.0)
    rng = random.Random(0)
    for _ in range(300):
        r1, r2 = rng.randrange(H), rng.randrange(H)
        c1, c2 = rng.randrange(W), rng.randrange(W)
        tr = rng.randrange(-min(r1, r2), H - max(r1, r2))
        tc = rng.randrange(-min(c1, c2), W - max(c1, c2))
        a = ids[r1 * W + c1, r2 * W + c2]
        b = ids[(r1 + tr) * W + c1 + tc, (r2 + tr) * W + c2 + tc]
        assert a == b


def test_bucket_cache_reuses_and_bounds():
    cache = BucketCache(maxsize=2)
    a = cache.get("product", 4, 5, 2.0, 0, "cpu")
    assert cache.get("product", 4, 5, 2.0, 0, "cpu") is a
    cache.get("product", 5, 5, 2.0, 0, "cpu")
    cache.get("euc", 5, 5, 2.0, 0, "cpu")
    assert len(cache) == 2
    assert cache.get("product", 4, 5, 2.0, 0, "cpu") is not a  # evicted, recomputed
    assert torch.equal(cache.get("product", 4, 5, 2.0, 0, "cpu"), a)


def test_bad_grid_and_method_raise():
    with pytest.raises(ValueError, match="positive"):
        bucket_ids_2d("product", 0, 5, 2.0)
    with pytest.raises(ValueError, match="unknown bucket method"):
        bucket_ids_2d("manhattan", 3, 3, 2.0)
