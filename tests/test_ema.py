"""``train.ema``: the weight average against a naive reference, its schedule (RT-DETR's ramp), buffers
copied exactly, and the config field (a mapping, or null). The training loop's use of it (validation,
checkpoints, an exact resume, what inference loads) is in test_accumulate.py."""
import math

import pytest
import torch
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from detr_irpe.config import ConfigError, EMAConfig, config_from_dict, load_config
from detr_irpe.engine.ema import ModelEMA


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(6, 4)
        self.norm = nn.BatchNorm1d(4)  # running statistics change every step
        self.frozen_norm = FrozenBatchNorm2d(4)  # statistics that never change
        self.frozen = nn.Parameter(torch.randn(3), requires_grad=False)
        with torch.no_grad():
            self.frozen_norm.running_mean.normal_()

    def forward(self, x):
        return self.frozen_norm(self.norm(self.linear(x))[..., None, None]).sum() + self.frozen.sum()


def test_the_average_equals_a_naive_reference_over_50_steps():
    torch.manual_seed(0)
    model = Small().double()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ema = ModelEMA(model, decay=0.99, warmup_steps=10)
    reference = {n: p.detach().clone() for n, p in model.named_parameters()}
    for step in range(1, 51):
        optimizer.zero_grad()
        (model(torch.randn(8, 6, dtype=torch.float64)) ** 2).backward()
        optimizer.step()
        ema.update(model)
        d = 0.99 * (1 - math.exp(-step / 10))
        for name, p in model.named_parameters():
            reference[name] = d * reference[name] + (1 - d) * p.detach() if p.requires_grad else p.detach().clone()
    assert ema.updates == 50
    averaged = dict(ema.module.named_parameters())
    for name, want in reference.items():
        torch.testing.assert_close(averaged[name], want, rtol=1e-12, atol=1e-15)
    assert not torch.allclose(averaged["linear.weight"], model.linear.weight)  # an average, not a copy
    for name, buffer in model.named_buffers():  # copied, not averaged: batch-norm statistics stay exact
        assert torch.equal(dict(ema.module.named_buffers())[name], buffer), name
    assert not any(p.requires_grad for p in ema.module.parameters()) and not ema.module.training


def test_the_decay_ramps_as_rt_detrs():
    ema = ModelEMA(Small(), decay=0.9999, warmup_steps=2000)
    assert ema.decay_at(1) == pytest.approx(0.9999 * (1 - math.exp(-1 / 2000)))
    assert ema.decay_at(2000) == pytest.approx(0.9999 * (1 - math.exp(-1)))
    assert ema.decay_at(100_000) == pytest.approx(0.9999)
    assert ModelEMA(Small(), decay=0.9, warmup_steps=0).decay_at(1) == 0.9  # no ramp


def test_the_config_field_is_a_mapping_or_null(tmp_path):
    cfg = load_config(None, ["train.ema={decay: 0.999, warmup_steps: 100}"])
    assert cfg.train.ema == EMAConfig(0.999, 100)
    assert config_from_dict(cfg.to_dict()) == cfg and cfg.to_dict()["train"]["ema"] == {"decay": 0.999,
                                                                                      "warmup_steps": 100}
    assert load_config(None, ["train.ema={}"]).train.ema == EMAConfig()  # the defaults: 0.9999, 2000
    assert load_config(None, ["train.ema=null"]).train.ema is None and load_config().train.ema is None
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  ema:\n    decay: 0.99\n")
    assert load_config(path).train.ema == EMAConfig(0.99, 2000)
    assert load_config("detr_r50_irpe_product_ctx_k_9x9_ema").train.ema == EMAConfig(0.9999, 2000)
    for bad, message in [("5", "expected a mapping like {decay: 0.9999, warmup_steps: 2000} or null"),
                         ("{decya: 0.9}", "unknown key 'decya'. Did you mean 'decay'?"),
                         ("{decay: 1.0}", "train.ema.decay must be in (0, 1)"),
                         ("{decay: 0}", "train.ema.decay must be in (0, 1)"),
                         ("{warmup_steps: -1}", "train.ema.warmup_steps must be >= 0"),
                         ("{warmup_steps: 2.5}", "train.ema.warmup_steps: expected an integer")]:
        with pytest.raises(ConfigError) as info:
            load_config(None, [f"train.ema={bad}"])
        assert message in str(info.value), bad
