"""Typed config: YAML + overrides, unknown keys named with the closest valid one, range checks."""
import dataclasses
import typing

import pytest

from detr_irpe.config import Config, ConfigError, apply_overrides, config_from_dict, load_config, save_config

FLOAT_KEYS = [f"{section.name}.{name}" for section in dataclasses.fields(Config)
              for name, tp in typing.get_type_hints(section.default_factory).items()
              if tp in (float, typing.Optional[float])]


def test_defaults_are_detr_r50():
    cfg = load_config()
    assert cfg.model.backbone == "resnet50" and cfg.model.hidden_dim == 256 and cfg.model.num_queries == 100
    assert cfg.train.lr == 1e-4 and cfg.train.lr_backbone == 1e-5 and cfg.train.clip_max_norm == 0.1


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  rpe: rpe-2.0-product-ctx-1-k\n  hidden_dim: 64\ntrain:\n  epochs: 3\n")
    cfg = load_config(path, ["train.lr=2e-4", "batch_size=4", "model.rpe=null", "data.train_scales=[96, 128]"])
    assert cfg.model.hidden_dim == 64 and cfg.train.epochs == 3
    assert cfg.train.lr == 2e-4 and cfg.train.batch_size == 4
    assert cfg.model.rpe is None and cfg.data.train_scales == [96, 128]


def test_round_trip_through_dict(tmp_path):
    cfg = load_config(None, ["model.rpe=rpe-1.9-product-ctx-1-k", "epochs=7"])
    assert config_from_dict(cfg.to_dict()) == cfg
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg


@pytest.mark.parametrize("override,expected", [
    ("train.lrr=1", "unknown config key 'train.lrr'. Did you mean 'lr'?"),
    ("modle.hidden_dim=3", "unknown section 'modle'. Did you mean 'model'?"),
    ("num_querys=5", "unknown config key 'num_querys'. Did you mean 'model.num_queries'?"),
    ("epochs", "not of the form key=value"),
    ("train.epochs=many", "expected an integer"),
    ("model.aux_loss=3", "expected true/false"),
])
def test_bad_overrides_name_the_key(override, expected):
    with pytest.raises(ConfigError) as info:
        apply_overrides(Config(), [override])
    assert expected in str(info.value)


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf", "inf", "1e999"])
def test_every_float_field_refuses_nan_and_infinity(value):
    assert "train.lr" in FLOAT_KEYS and "train.max_minutes" in FLOAT_KEYS
    for key in FLOAT_KEYS:
        with pytest.raises(ConfigError) as info:
            apply_overrides(Config(), [f"{key}={value}"])
        assert f"{key}: expected a finite number, got " in str(info.value), key


def test_a_yaml_file_with_an_infinite_value_names_the_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: .inf\n")
    with pytest.raises(ConfigError, match=r"train.lr: expected a finite number, got inf"):
        load_config(path)


def test_unknown_yaml_key_names_file_and_closest(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  hiden_dim: 64\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in str(info.value) and "Did you mean 'hidden_dim'?" in str(info.value)


@pytest.mark.parametrize("override,expected", [
    ("train.lr=-1", "train.lr must be > 0"),
    ("model.num_queries=0", "model.num_queries must be > 0"),
    ("model.nheads=7", "must divide model.hidden_dim"),
    ("model.rpe=rpe-2.0-product", "malformed iRPE spec"),
    ("train.amp=fp8", "train.amp must be"),
])
def test_out_of_range_values(override, expected):
    with pytest.raises(ConfigError, match="invalid config") as info:
        load_config(None, [override])
    assert expected in str(info.value)


def test_missing_and_malformed_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    notmap = tmp_path / "list.yaml"
    notmap.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(notmap)
