"""RPEMultiheadAttention against a naive reference, nn.MultiheadAttention, and gradcheck."""
import itertools

import pytest
import torch
from torch import nn
from torch.func import functional_call

from detr_irpe.irpe import BucketCache, RPEConfig, RPEMultiheadAttention
from helpers import LargestTensor, randomize_tables
from irpe_reference import attention_ref

RPE_ON = ["q", "k", "v", "qk", "kv", "qv", "qkv"]
COMBOS = [
    (method, mode, on, shared)
    for method, mode, on, shared in itertools.product(["euc", "quant", "cross", "product"], ["bias", "contextual"],
                                                      RPE_ON, [True, False])
    if not (mode == "bias" and "v" in on)
]


def make_inputs(hw, skip, batch=2, channels=16, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    L = skip + hw[0] * hw[1]
    x = torch.randn(L, batch, channels, generator=g, dtype=dtype)
    kpm = torch.zeros(batch, L, dtype=torch.bool)
    kpm[1, -3:] = True  # the second image has padded tokens
    return x, kpm


@pytest.mark.parametrize("method,mode,rpe_on,shared", COMBOS)
def test_matches_naive_reference(method, mode, rpe_on, shared):
    torch.manual_seed(0)
    for hw, skip in [((3, 5), 0), ((4, 2), 1)]:  # non-square grids, with and without a skip token
        cfg = RPEConfig(ratio=1.0 if method == "product" else 2.0, method=method, mode=mode,
                        shared_head=shared, rpe_on=rpe_on, skip=skip)
        attn = RPEMultiheadAttention(16, 4, rpe=cfg).double().eval()
        randomize_tables(attn, torch.Generator().manual_seed(1))
        x, kpm = make_inputs(hw, skip)
        out, weights = attn(x, x, x, key_padding_mask=kpm, hw=hw, need_weights=True)
        out_fast, _ = attn(x, x, x, key_padding_mask=kpm, hw=hw)  # SDPA path when possible
        ref_out, ref_weights = attention_ref(attn, x, kpm, hw)
        torch.testing.assert_close(out, ref_out, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(out_fast, ref_out, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(weights, ref_weights, rtol=1e-9, atol=1e-9)


def test_table_shapes_follow_the_release():
    a = RPEMultiheadAttention(256, 8, rpe="rpe-2.0-product-ctx-1-k")
    assert a.rpe_q is None and a.rpe_v is None
    assert a.rpe_k.lookup_table_weight.shape == (1, 32, 81)
    b = RPEMultiheadAttention(256, 8, rpe="rpe-1.9-euc-bias-0-qk")
    assert b.rpe_q.lookup_table_bias.shape == (8, 7) and b.rpe_k.lookup_table_bias.shape == (8, 7)
    c = RPEMultiheadAttention(256, 8, rpe="rpe-2.0-cross-ctx-0-qkv")
    keys = {k: tuple(v.shape) for k, v in c.state_dict().items() if "rpe" in k}
    assert keys == {
        "rpe_q.rp_rows.lookup_table_weight": (8, 32, 9), "rpe_q.rp_cols.lookup_table_weight": (8, 32, 9),
        "rpe_k.rp_rows.lookup_table_weight": (8, 32, 9), "rpe_k.rp_cols.lookup_table_weight": (8, 32, 9),
        "rpe_v.rp_rows.lookup_table_weight": (8, 9, 32), "rpe_v.rp_cols.lookup_table_weight": (8, 9, 32),
    }
    plain = set(nn.MultiheadAttention(256, 8).state_dict())
    assert plain == {k for k in c.state_dict() if "rpe" not in k}


@pytest.mark.parametrize("training", [False, True])
def test_no_rpe_equals_nn_multihead_attention(training):
    torch.manual_seed(0)
    ref = nn.MultiheadAttention(32, 4, dropout=0.0)
    ours = RPEMultiheadAttention(32, 4, dropout=0.0, rpe=None)
    ours.load_state_dict(ref.state_dict())
    ref.train(training), ours.train(training)
    q = torch.randn(12, 3, 32)
    k = torch.randn(12, 3, 32)
    v = torch.randn(12, 3, 32)
    kpm = torch.zeros(3, 12, dtype=torch.bool)
    kpm[2, 7:] = True
    causal = torch.triu(torch.ones(12, 12, dtype=torch.bool), 1)
    for args in [(q, q, q), (q, k, v), (q, q, v)]:
        for mask in [None, causal, torch.randn(12, 12)]:
            want, want_w = ref(*args, key_padding_mask=kpm, attn_mask=mask)
            got, _ = ours(*args, key_padding_mask=kpm, attn_mask=mask)
            got2, got_w = ours(*args, key_padding_mask=kpm, attn_mask=mask, need_weights=True)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(got2, want, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(got_w, want_w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("spec", ["rpe-2.0-product-ctx-1-qkv", "rpe-2.0-euc-bias-0-qk", "rpe-2.0-cross-ctx-0-qkv"])
def test_fresh_tables_are_zero_and_equal_plain_twin(spec):
    torch.manual_seed(0)
    plain = RPEMultiheadAttention(32, 4).eval()
    rpe = RPEMultiheadAttention(32, 4, rpe=spec).eval()
    rpe.load_state_dict(plain.state_dict(), strict=False)
    assert all(p.abs().sum() == 0 for n, p in rpe.named_parameters() if "lookup_table" in n)
    x = torch.randn(20, 2, 32)
    torch.testing.assert_close(rpe(x, x, x, hw=(4, 5))[0], plain(x, x, x)[0], rtol=1e-5, atol=1e-6)


GRADCHECK_SPECS = ["rpe-1.0-product-bias-0-qk", "rpe-1.0-product-ctx-1-qkv", "rpe-1.0-cross-ctx-0-qkv",
                   "rpe-1.0-euc-bias-1-k", "rpe-1.0-quant-ctx-0-v"]


@pytest.mark.parametrize("spec", GRADCHECK_SPECS)
def test_gradcheck_float64(spec):
    torch.manual_seed(0)
    attn = RPEMultiheadAttention(8, 2, rpe=spec).double().eval()
    randomize_tables(attn, torch.Generator().manual_seed(2))
    x, kpm = make_inputs((2, 3), 0, batch=2, channels=8)
    names = [n for n, _ in attn.named_parameters() if "lookup_table" in n] + ["in_proj_weight"]
    params = {n: p.detach().clone().requires_grad_() for n, p in attn.named_parameters() if n in names}

    def f(x, *tables):
        out, _ = functional_call(attn, dict(zip(params, tables)), (x, x, x),
                                 {"key_padding_mask": kpm, "hw": (2, 3)})
        return out

    assert torch.autograd.gradcheck(f, (x.requires_grad_(), *params.values()), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("spec", ["rpe-2.0-product-ctx-0-qkv", "rpe-2.0-cross-ctx-1-qkv", "rpe-2.0-euc-bias-0-qk"])
def test_never_materialises_pairwise_head_dim_tensor(spec):
    """Forward and backward never allocate a tensor of L*L*head_dim elements (the explicit path;
    the blockwise kernels never hold more than a block of logits, see test_irpe_fastpaths.py)."""
    H, W, heads, head_dim = 6, 7, 2, 16
    L = H * W
    attn = RPEMultiheadAttention(heads * head_dim, heads, rpe=spec, rpe_impl="sdpa")
    x = torch.randn(L, 1, heads * head_dim, requires_grad=True)
    with LargestTensor() as probe:
        out, _ = attn(x, x, x, hw=(H, W))
        out.sum().backward()
    assert probe.largest < L * L * head_dim
    assert probe.largest >= heads * L * L  # the attention logits themselves were seen


def test_bucket_cache_is_shared_and_reused():
    cache = BucketCache()
    a = RPEMultiheadAttention(16, 2, rpe="rpe-2.0-product-ctx-1-k", bucket_cache=cache)
    b = RPEMultiheadAttention(16, 2, rpe="rpe-2.0-product-ctx-1-k", bucket_cache=cache)
    x = torch.randn(12, 1, 16)
    a(x, x, x, hw=(3, 4)), b(x, x, x, hw=(3, 4))
    assert len(cache) == 1
    b(x, x, x, hw=(4, 3))
    assert len(cache) == 2
    assert "bucket_cache" not in str(a.state_dict().keys())


def test_clear_errors():
    a = RPEMultiheadAttention(16, 2, rpe="rpe-2.0-product-ctx-1-k")
    x = torch.randn(12, 1, 16)
    with pytest.raises(ValueError, match=r"hw=\(3, 5\) gives 15 image tokens"):
        a(x, x, x, hw=(3, 5))
    with pytest.raises(ValueError, match="pass hw"):
        a(x, x, x)  # 12 tokens is not a square grid
    with pytest.raises(ValueError, match="self-attention"):
        a(x, torch.randn(5, 1, 16), torch.randn(5, 1, 16), hw=(3, 4))
    with pytest.raises(ValueError, match="must be positive and divide"):
        RPEMultiheadAttention(30, 4)
    with pytest.raises(ValueError, match="malformed iRPE spec"):
        RPEMultiheadAttention(16, 2, rpe="rpe-2.0-product-ctx")
    sq = torch.randn(16, 1, 16)
    out, _ = a(sq, sq, sq)  # a square grid may omit hw, as in the release
    assert out.shape == sq.shape


def test_autocast_bfloat16_runs():
    a = RPEMultiheadAttention(16, 2, rpe="rpe-2.0-product-ctx-1-qkv")
    x = torch.randn(12, 2, 16)
    kpm = torch.zeros(2, 12, dtype=torch.bool)
    kpm[0, -2:] = True
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = a(x, x, x, key_padding_mask=kpm, hw=(3, 4))
    assert torch.isfinite(out).all()
