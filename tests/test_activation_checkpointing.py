"""Activation checkpointing (``train.activation_checkpointing``) changes memory, not numbers: the
recompute draws the same dropout masks as the first pass (torch's RNG state is put back for it,
and every iRPE kernel takes its seed from that generator), so the gradients equal plain training's,
with attention dropout on, for every way the iRPE attention runs; under autocast too."""
import copy

import pytest
import torch
import torch.utils.checkpoint

from detr_irpe.irpe import RPE_IMPLS, native, parse_rpe_spec, triton_kernel
from detr_irpe.irpe.attention import triton_refusal
from detr_irpe.models import build_detr
from detr_irpe.models import checkpointing as ckpt
from detr_irpe.models.checkpointing import set_activation_checkpointing
from helpers import load_benchmark
from test_accumulate import close, make_images, make_targets, pad

PARTS = ["backbone", "encoder", "decoder"]
# The tiny CNN (ordinary batch norm: its running statistics must be updated once, not twice),
# iRPE contextual on keys, head_dim 32 (what every kernel takes), dropout everywhere, attention
# dropout included.
MODEL = dict(backbone="tiny", backbone_weights="none", hidden_dim=64, nheads=2, enc_layers=2, dec_layers=2,
             dim_feedforward=64, num_queries=5, num_classes=3, rpe="rpe-2.0-product-ctx-1-k", dropout=0.3)
CPU_KERNELS = ("native", "chunked", "sdpa")


def setting(impl):
    """``(device, dtype, relative tolerance)`` to check ``impl`` in, or the reason it cannot run here.

    The hook for every kernel in RPE_IMPLS: the CPU ones in float64; the Triton kernel in float32 on
    a GPU, or on the CPU through triton's interpreter (``TRITON_INTERPRET=1`` in the environment of
    pytest, so that it is set before triton is imported), where a recompute gives the same bits;
    on a GPU its table gradients add with atomics, in another order each time."""
    if impl in CPU_KERNELS:
        if impl == "native" and native.load() is None:
            return f"the compiled CPU kernel is unavailable: {native.unavailable_reason()}"
        return "cpu", torch.float64, 1e-10
    if impl == "triton":
        device = "cuda" if torch.cuda.is_available() else "cpu"
        reason = triton_refusal(parse_rpe_spec(MODEL["rpe"]), device, torch.float32,
                                MODEL["hidden_dim"] // MODEL["nheads"], MODEL["dropout"])
        return reason or (device, torch.float32, 1e-5 if device == "cuda" else 1e-10)
    return f"no setting for rpe_impl={impl} in this test yet: add one to setting()"


# the Triton kernel runs here only when triton was imported for its interpreter (or on a GPU)
IMPLS = [i for i in RPE_IMPLS if i != "auto" and (i != "triton" or triton_kernel.INTERPRETED
                                                  or torch.cuda.is_available())]


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def gradients(model, criterion, images, targets, seed=5, amp=None):
    """Gradients and batch-norm statistics after one forward / backward, dropout drawn from ``seed``."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    parameter = model.class_embed.weight
    batch, mask = pad([image.to(parameter.dtype) for image in images])
    with torch.autocast("cpu", dtype=amp, enabled=amp is not None):
        outputs = model(batch.to(parameter.device), mask.to(parameter.device))
    criterion.weighted_loss(criterion(outputs, targets)).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    stats = {n: b.clone() for n, b in model.named_buffers() if "running" in n or "num_batches" in n}
    return grads, stats


def twins(impl, dtype=torch.float64, device="cpu"):
    torch.manual_seed(0)
    plain, criterion, _ = build_detr(**MODEL, rpe_impl=impl)
    plain.to(device, dtype).train()
    criterion.to(device)
    with torch.no_grad():
        for name, p in plain.named_parameters():
            if "lookup_table" in name:
                p.normal_(0, 0.1)
    checkpointed = copy.deepcopy(plain)
    set_activation_checkpointing(checkpointed, PARTS)
    return plain, checkpointed, criterion


def check_checkpointed_gradients(impl, sizes=((96, 128), (64, 96)), other_seed=True):
    """Asserts that the checkpointed model's gradients and batch-norm statistics equal the plain one's
    with dropout on (``other_seed``: and that another seed would give other gradients), and that each
    checkpointed part ran again in backward."""
    device, dtype, rel = setting(impl)
    plain, checkpointed, criterion = twins(impl, dtype, device)
    images, targets = make_images(sizes), make_targets([2, 1][:len(sizes)])
    want, want_stats = gradients(plain, criterion, images, targets)
    if other_seed:
        other, _ = gradients(plain, criterion, images, targets, seed=6)
        assert any(not torch.equal(other[n], want[n]) for n in want)  # dropout is on: another seed, other gradients
    runs = []
    for module in (checkpointed.backbone[0].body.stage3, checkpointed.transformer.encoder.layers[1],
                   checkpointed.transformer.decoder.layers[0]):
        module.register_forward_pre_hook(lambda *args: runs.append(1))
    got, got_stats = gradients(checkpointed, criterion, images, targets)
    assert len(runs) == 3 * 2  # each started again in backward (and stopped once it had what backward needs)
    assert want.keys() == got.keys() and len(want) > 40
    for name in want:
        scale = want[name].abs().max().item()
        assert (got[name] - want[name]).abs().max().item() <= rel * max(scale, 1e-30), f"{impl}: gradient of {name}"
    for name in want_stats:  # batch norm updated its statistics once
        assert torch.equal(got_stats[name], want_stats[name]), name


@pytest.mark.parametrize("impl", IMPLS)
def test_checkpointed_gradients_equal_plain_ones_with_attention_dropout(impl):
    """Every kernel this process can run; the Triton kernel on a CPU runs in the interpreter process of
    test_irpe_triton.py (test_activation_checkpointing_recomputes_the_triton_kernels_masks)."""
    if isinstance(setting(impl), str):
        pytest.skip(setting(impl))
    check_checkpointed_gradients(impl)


def test_without_the_rng_state_the_recompute_would_draw_other_masks(monkeypatch):
    """The check above has teeth: a recompute that draws new dropout masks gives other gradients."""
    plain, checkpointed, criterion = twins("native" if native.load() is not None else "chunked")
    images, targets = make_images([(96, 128)]), make_targets([2])
    want, _ = gradients(plain, criterion, images, targets)
    real = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(ckpt, "checkpoint", lambda fn, *a, **k: real(fn, *a, **{**k, "preserve_rng_state": False}))
    got, _ = gradients(checkpointed, criterion, images, targets)
    assert any((got[n] - want[n]).abs().max() > 1e-6 * want[n].abs().max() for n in want)


def test_checkpointing_under_autocast_and_only_in_training():
    plain, checkpointed, criterion = twins("auto", dtype=torch.float32)
    images, targets = make_images([(96, 128)]), make_targets([3])
    images = [i.float() for i in images]
    want, _ = gradients(plain, criterion, images, targets, amp=torch.bfloat16)
    got, _ = gradients(checkpointed, criterion, images, targets, amp=torch.bfloat16)
    for name in want:
        close(got[name], want[name], f"bf16: gradient of {name}")
    recomputed = []
    layer = checkpointed.transformer.encoder.layers[0]
    layer.register_forward_hook(lambda *args: recomputed.append(1))
    checkpointed.eval()
    with torch.no_grad():
        checkpointed(pad(images)[0], pad(images)[1])
    assert len(recomputed) == 1  # evaluation runs each layer once, nothing kept for a backward


def test_parts_are_checked():
    model, _, _ = build_detr(**MODEL)
    with pytest.raises(ValueError, match="transformer"):
        set_activation_checkpointing(model, ["transformer"])
    set_activation_checkpointing(model, ["encoder"])
    assert model.transformer.encoder.checkpointing and not model.transformer.decoder.checkpointing


def test_the_memory_benchmark_runs(capsys):
    """benchmarks/training_memory.py on a tiny model, so that it cannot rot."""
    bench = load_benchmark("training_memory")
    result = bench.main(["--small", "--backbone", "resnet18", "--size", "64", "80", "--reps", "1"])
    assert set(result["rows"]) == set(bench.CHOICES) and all(r["activations"] > 0 for r in result["rows"].values())
    assert all(t > 0 for t in result["times"].values()) and result["normalizers"] > 0
    assert "| all three |" in capsys.readouterr().out
