"""The fast iRPE paths against the naive float64 reference: the blockwise kernels (the row-chunked
``rpe_impl="chunked"`` and the compiled ``"native"``, whose other tests are in
test_irpe_native.py) and the full-mask SDPA path (``rpe_impl="sdpa"``).

Blocks of 4 query rows (the last one partial: 3 of 15 rows, or 1 of 9) and of all rows, padding,
a skip token, every method / mode / rpe_on / shared_head; outputs and the gradients of the
input, the projections and every table; dropout (same masks in forward and backward, kept
weights scaled by 1 / (1 - p)); and that no ``(B, H, L, L)`` tensor is ever formed.
"""
import itertools

import pytest
import torch
from torch.func import functional_call

from detr_irpe.irpe import METHODS, RPEConfig, RPEMultiheadAttention, native
from detr_irpe.irpe.spec import MAX_RATIO
from helpers import LargestTensor
from irpe_reference import attention_ref
from test_irpe_attention import COMBOS, make_inputs, randomize_tables


def blockwise(cfg, channels=16, heads=4, rows=None, dropout=0.0, impl="chunked"):
    attn = RPEMultiheadAttention(channels, heads, dropout=dropout, rpe=cfg, rpe_impl=impl).double()
    attn.chunk_rows = rows
    randomize_tables(attn, torch.Generator().manual_seed(1))
    return attn


def config(method, mode, rpe_on, shared, skip):
    return RPEConfig(ratio=1.0 if method == "product" else 2.0, method=method, mode=mode,
                     shared_head=shared, rpe_on=rpe_on, skip=skip)


@pytest.mark.parametrize("impl", ["chunked", "native"])
@pytest.mark.parametrize("method,mode,rpe_on,shared", COMBOS)
def test_blockwise_matches_reference_forward_and_backward(method, mode, rpe_on, shared, impl):
    """Outputs and the gradients of the input, the projections and every table, in float64."""
    torch.manual_seed(0)
    for (hw, skip), rows in itertools.product([((3, 5), 0), ((4, 2), 1)], [4, None]):
        attn = blockwise(config(method, mode, rpe_on, shared, skip), rows=rows, impl=impl).eval()
        x, kpm = make_inputs(hw, skip)
        x = x.requires_grad_()
        grad = torch.randn_like(x)
        out, _ = attn(x, x, x, key_padding_mask=kpm, hw=hw)
        got = torch.autograd.grad(out, [x, *attn.parameters()], grad)
        ref_out, _ = attention_ref(attn, x, kpm, hw)
        want = torch.autograd.grad(ref_out, [x, *attn.parameters()], grad)
        torch.testing.assert_close(out, ref_out, rtol=1e-9, atol=1e-9)
        for (name, _), g, w in zip(attn.named_parameters(), got[1:], want[1:]):
            torch.testing.assert_close(g, w, rtol=1e-8, atol=1e-9, msg=f"gradient of {name}")
        torch.testing.assert_close(got[0], want[0], rtol=1e-8, atol=1e-9)


@pytest.mark.parametrize("method,mode,rpe_on,shared", COMBOS)
def test_sdpa_path_matches_reference(method, mode, rpe_on, shared):
    """The full-mask path (the default off CPU), which folds padding into the iRPE logits in place."""
    torch.manual_seed(0)
    for hw, skip in [((3, 5), 0), ((4, 2), 1)]:
        attn = RPEMultiheadAttention(16, 4, rpe=config(method, mode, rpe_on, shared, skip), rpe_impl="sdpa")
        attn = attn.double().eval()
        randomize_tables(attn, torch.Generator().manual_seed(1))
        x, kpm = make_inputs(hw, skip)
        x = x.requires_grad_()
        out, _ = attn(x, x, x, key_padding_mask=kpm, hw=hw)
        ref_out, _ = attention_ref(attn, x, kpm, hw)
        torch.testing.assert_close(out, ref_out, rtol=1e-9, atol=1e-9)
        got = torch.autograd.grad(out.sum(), [x, *attn.parameters()])
        want = torch.autograd.grad(ref_out.sum(), [x, *attn.parameters()])
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-8, atol=1e-9)


def test_sdpa_path_leaves_a_callers_attn_mask_alone():
    attn = RPEMultiheadAttention(16, 2, rpe="rpe-2.0-product-ctx-1-k", rpe_impl="sdpa")
    x = torch.randn(12, 1, 16)
    kpm = torch.zeros(1, 12, dtype=torch.bool)
    kpm[0, -2:] = True
    for mask in (torch.randn(12, 12), torch.randn(2, 12, 12)):
        before = mask.clone()
        attn(x, x, x, key_padding_mask=kpm, attn_mask=mask, hw=(3, 4))
        assert torch.equal(mask, before)


@pytest.mark.parametrize("spec", ["rpe-1.0-product-ctx-1-k", "rpe-1.0-product-bias-0-qk", "rpe-1.0-cross-ctx-0-qkv",
                                  "rpe-1.0-euc-ctx-1-qv"])
@pytest.mark.parametrize("impl", ["chunked", "native"])
def test_blockwise_agrees_with_sdpa_path_float32(spec, impl):
    """At a DETR-like size, in float32, the blockwise kernels and SDPA give the same outputs and gradients."""
    torch.manual_seed(0)
    hw = (7, 9)
    fast = RPEMultiheadAttention(32, 4, rpe=spec, rpe_impl=impl)
    fast.chunk_rows = 10
    slow = RPEMultiheadAttention(32, 4, rpe=spec, rpe_impl="sdpa")
    randomize_tables(fast, torch.Generator().manual_seed(3))
    slow.load_state_dict(fast.state_dict())
    x = torch.randn(63, 3, 32, requires_grad=True)
    kpm = torch.zeros(3, 63, dtype=torch.bool)
    kpm[1].view(7, 9)[:, 6:] = True
    kpm[2].view(7, 9)[5:] = True
    grad = torch.randn_like(x)
    results = []
    for attn in (fast, slow):
        out, _ = attn(x, x, x, key_padding_mask=kpm, hw=hw)
        results.append((out, torch.autograd.grad(out, [x, *attn.parameters()], grad)))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-4, atol=1e-5)
    for g, w in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("impl", ["chunked", "native"])
@pytest.mark.parametrize("spec", ["rpe-0.5-product-ctx-1-qkv", "rpe-1.0-cross-bias-0-qk"])
def test_gradcheck_with_dropout_in_several_blocks(spec, impl):
    """With the RNG reset before each call the dropout masks are fixed, so gradcheck sees one function."""
    attn = blockwise(spec, channels=8, heads=2, rows=2, dropout=0.3, impl=impl).train()
    x, kpm = make_inputs((2, 3), 0, batch=2, channels=8)
    names = [n for n, _ in attn.named_parameters() if "lookup_table" in n] + ["in_proj_weight"]
    params = {n: p.detach().clone().requires_grad_() for n, p in attn.named_parameters() if n in names}

    def f(x, *tables):
        torch.manual_seed(7)
        out, _ = functional_call(attn, dict(zip(params, tables)), (x, x, x), {"key_padding_mask": kpm, "hw": (2, 3)})
        return out

    assert not torch.equal(f(x, *params.values()), attn.eval()(x, x, x, key_padding_mask=kpm, hw=(2, 3))[0])
    attn.train()
    assert torch.autograd.gradcheck(f, (x.requires_grad_(), *params.values()), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("impl", ["chunked", "native"])
def test_dropout_drops_whole_weights_and_rescales_the_rest(impl):
    """With one-hot tokens, v = token and an identity output projection, each output row is a row
    of the attention weights: after dropout every weight is 0 or the undropped weight / (1 - p)."""
    torch.manual_seed(0)
    L, p = 16, 0.25
    attn = blockwise("rpe-1.0-product-ctx-1-k", channels=L, heads=1, rows=3, dropout=p, impl=impl)
    with torch.no_grad():
        attn.in_proj_weight[2 * L:] = torch.eye(L)
        attn.out_proj.weight.copy_(torch.eye(L))
        attn.out_proj.bias.zero_()
    x = torch.eye(L, dtype=torch.float64).unsqueeze(1)  # (L, 1, L): token i is e_i
    _, weights = attn.eval()(x, x, x, hw=(4, 4), need_weights=True)
    dropped, _ = attn.train()(x, x, x, hw=(4, 4))
    dropped, weights = dropped[:, 0], weights[0]
    kept = dropped != 0
    assert 0 < (~kept).sum() < L * L
    torch.testing.assert_close(dropped[kept], weights[kept] / (1 - p), rtol=1e-9, atol=1e-12)
    again, _ = attn(x, x, x, hw=(4, 4))
    assert not torch.equal(again[:, 0], dropped)  # fresh masks on each call


@pytest.mark.parametrize("spec", ["rpe-2.0-product-ctx-1-qkv", "rpe-2.0-cross-ctx-0-qk", "rpe-2.0-euc-bias-0-k"])
def test_chunked_never_forms_a_full_attention_matrix(spec):
    """Forward and backward stay below one (B, H, L, L) tensor, let alone L*L*head_dim: the largest
    are a block of logits (B, H, rows, L) and key projections on every bucket (B, H, L, 81)."""
    B, H, W, heads = 2, 9, 10, 2
    L = H * W
    attn = RPEMultiheadAttention(32, heads, dropout=0.1, rpe=spec, rpe_impl="chunked").train()
    attn.chunk_rows = 8
    x = torch.randn(L, B, 32, requires_grad=True)
    kpm = torch.zeros(B, L, dtype=torch.bool)
    kpm[1, -5:] = True
    with LargestTensor() as probe:
        out, _ = attn(x, x, x, key_padding_mask=kpm, hw=(H, W))
        out.sum().backward()
    assert probe.largest <= B * heads * max(8 * L, 81 * L) < B * heads * L * L
    assert all(p.grad is not None for p in attn.parameters())


@pytest.mark.parametrize("impl", ["chunked", "native"])
def test_padding_is_exact_and_tiny_weights_do_not_matter(impl):
    """Padded keys get weight exactly 0; logits 200 below the rest (exp below the smallest normal
    float32) still give the reference's result."""
    torch.manual_seed(0)
    attn = blockwise("rpe-1.0-product-bias-1-k", rows=2, impl=impl).eval()
    x, kpm = make_inputs((3, 5), 0)
    out, _ = attn(x, x, x, key_padding_mask=kpm, hw=(3, 5))
    v = x.clone()
    v[-3:, 1] = 1e30  # the padded tokens of the second image, as values
    out_v, _ = attn(x, x, v, key_padding_mask=kpm, hw=(3, 5))
    assert torch.equal(out_v, out)
    with torch.no_grad():
        attn.rpe_k.lookup_table_bias[0, 0] = -200.0
    ref, _ = attention_ref(attn, x, kpm, (3, 5))
    out32, _ = attn.float()(x.float(), x.float(), x.float(), key_padding_mask=kpm, hw=(3, 5))
    torch.testing.assert_close(out32.double(), ref, rtol=1e-5, atol=1e-5)


# The largest ratio the spec allows (product: 401^2 = 160,801 buckets, beyond the compiled
# kernel's int16 ids, so that `auto` must take the row-chunked kernel), and the largest the
# kernel holds (product at 45.4: 181^2 = 32,761 buckets, the skip bucket 32,761).
@pytest.mark.parametrize("ratio", [MAX_RATIO, 45.4])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("rpe_on", ["q", "k", "v", "qkv"])
def test_largest_ratios_match_reference(ratio, method, rpe_on):
    """Every method and rpe_on, contextual and bias, with and without a skip token: ``auto`` (and
    ``native`` wherever it accepts the config) against the float64 reference, forward and backward."""
    torch.manual_seed(0)
    hw = (3, 4)
    for mode, skip in itertools.product(["contextual", "bias"], [0, 1]):
        if mode == "bias" and "v" in rpe_on:
            continue
        cfg = RPEConfig(ratio=ratio, method=method, mode=mode, shared_head=False, rpe_on=rpe_on, skip=skip)
        x, kpm = make_inputs(hw, skip, channels=8)
        if not native.represents(cfg):
            with pytest.raises(ValueError, match="int16 bucket ids"):
                blockwise(cfg, channels=8, heads=2, impl="native")(x, x, x, hw=hw)
        for impl in ["auto", "native"] if native.represents(cfg) else ["auto"]:
            attn = blockwise(cfg, channels=8, heads=2, impl=impl).eval()
            x = x.detach().requires_grad_()
            out, _ = attn(x, x, x, key_padding_mask=kpm, hw=hw)
            ref_out, _ = attention_ref(attn, x, kpm, hw)
            torch.testing.assert_close(out, ref_out, rtol=1e-9, atol=1e-9, msg=f"{cfg.spec} skip {skip} {impl}")
            got = torch.autograd.grad(out.square().sum(), [x, *attn.parameters()])
            want = torch.autograd.grad(ref_out.square().sum(), [x, *attn.parameters()])
            for g, w in zip(got, want):
                torch.testing.assert_close(g, w, rtol=1e-8, atol=1e-9, msg=f"{cfg.spec} skip {skip} {impl}")
