"""The iRPE spec string: round trips and clear errors."""
import pytest

from detr_irpe.irpe import RPEConfig, as_rpe_config, parse_rpe_spec

VALID = [
    "rpe-2.0-product-ctx-1-k", "rpe-1.9-product-ctx-1-k", "rpe-2.5-product-ctx-0-qkv",
    "rpe-3.0-product-bias-1-qk", "rpe-1.9-euc-bias-0-qk", "rpe-2.0-quant-ctx-1-v",
    "rpe-2.0-cross-ctx-1-qk", "rpe-2.0-cross-bias-0-q", "rpe-2.0-euc-ctx-0-kv",
]


@pytest.mark.parametrize("spec", VALID)
def test_valid_specs_round_trip(spec):
    cfg = parse_rpe_spec(spec)
    assert cfg.spec == spec
    assert parse_rpe_spec(cfg.spec) == cfg
    assert as_rpe_config(spec) == cfg


def test_fields_and_coefficients():
    cfg = parse_rpe_spec("rpe-1.9-euc-bias-0-qk")
    assert (cfg.ratio, cfg.method, cfg.mode, cfg.shared_head, cfg.rpe_on) == (1.9, "euc", "bias", False, "qk")
    assert (cfg.alpha, cfg.beta, cfg.gamma) == (1.9, 3.8, 15.2)
    assert cfg.num_buckets == 7
    ctx = parse_rpe_spec("rpe-2.0-product-ctx-1-k")
    assert ctx.mode == "contextual" and ctx.shared_head and ctx.num_buckets == 81
    assert parse_rpe_spec("rpe-2.0-product-contextual-1-kq").rpe_on == "qk"  # canonical order


def test_no_rpe():
    assert as_rpe_config(None) is None and as_rpe_config("") is None and as_rpe_config("none") is None


MALFORMED = [
    ("rpe-2.0-product-ctx-1", "6 '-'-separated fields"),
    ("rpe-2.0-product-ctx-1-k-x", "6 '-'-separated fields"),
    ("abc-2.0-product-ctx-1-k", "must start with 'rpe-'"),
    ("rpe-two-product-ctx-1-k", "is not a number"),
    ("rpe-nan-product-ctx-1-k", "finite number"),
    ("rpe-0.2-product-ctx-1-k", ">= 0.5"),
    ("rpe-2.0-manhattan-ctx-1-k", "unknown method 'manhattan'"),
    ("rpe-2.0-product-context-1-k", "unknown mode 'context'"),
    ("rpe-2.0-product-ctx-2-k", "shared_head must be 0 or 1"),
    ("rpe-2.0-product-ctx-1-x", "rpe_on"),
    ("rpe-2.0-product-ctx-1-kk", "rpe_on"),
    ("rpe-2.0-product-ctx-1-", "rpe_on"),
    ("rpe-2.0-product-bias-1-v", "bias mode has no encoding on values"),
    ("", "6 '-'-separated fields"),
]


@pytest.mark.parametrize("spec,why", MALFORMED)
def test_malformed_specs_raise_clear_error(spec, why):
    with pytest.raises(ValueError) as info:
        parse_rpe_spec(spec)
    msg = str(info.value)
    assert repr(spec) in msg  # quotes the spec
    assert why in msg
    assert "rpe-{ratio}-{method}-{mode}-{shared_head}-{rpe_on}" in msg  # shows the format
    assert "euc, quant, cross, product" in msg  # and the choices


def test_non_string_spec():
    with pytest.raises(ValueError, match="expected a string"):
        parse_rpe_spec(2.0)
    with pytest.raises(TypeError, match="spec string"):
        as_rpe_config(3)


def test_config_validation():
    with pytest.raises(ValueError, match="method"):
        RPEConfig(method="foo")
    with pytest.raises(ValueError, match="skip"):
        RPEConfig(skip=-1)
