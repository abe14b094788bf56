"""Faults during training: exact resume, SIGTERM, atomic checkpoints, non-finite losses."""
import os
import signal

import pytest
import torch

from helpers import tiny_overrides
from detr_irpe.config import load_config
from detr_irpe.engine.checkpoint import load_checkpoint_file
from detr_irpe.engine.state import CheckpointKeeper, atomic_save
from detr_irpe.engine.step import NonFiniteLossError
from detr_irpe.engine.train import Trainer, TrainingStopped


def make_cfg(out, **extra):
    values = {"train.epochs": 2, "train.eval_every": 0, "data.num_workers": 0}
    values.update(extra)
    return load_config(None, tiny_overrides(out, **values))


def sigterm_after(model, calls: int):
    """Send this process SIGTERM during the ``calls``-th forward pass (as a preemption would)."""
    count = {"n": 0}

    def hook(module, args, output):
        count["n"] += 1
        if count["n"] == calls:
            os.kill(os.getpid(), signal.SIGTERM)

    return model.register_forward_hook(hook)


def test_sigterm_then_resume_equals_straight_run(tmp_path):
    # 6 train images, batch 2: 3 iterations per epoch, 6 in all, with dropout and augmentation
    straight = Trainer(make_cfg(tmp_path / "straight"), quiet=True)
    straight.fit()
    want = straight.model.state_dict()

    interrupted = Trainer(make_cfg(tmp_path / "split"), quiet=True)
    handle = sigterm_after(interrupted.model, calls=4)  # during epoch 1, iteration 0
    with pytest.raises(TrainingStopped) as stopped:  # an unfinished run is not a finished one
        interrupted.fit()
    handle.remove()
    assert stopped.value.exit_code == 128 + signal.SIGTERM
    assert (interrupted.epoch, interrupted.step_in_epoch) == (1, 1)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handler restored

    resumed = Trainer(make_cfg(tmp_path / "split"), resume=str(tmp_path / "split" / "checkpoint.pth"), quiet=True)
    assert (resumed.epoch, resumed.step_in_epoch, resumed.global_step) == (1, 1, 4)
    resumed.fit()
    got = resumed.model.state_dict()
    assert want.keys() == got.keys()
    for k in want:
        assert torch.equal(want[k], got[k]), f"{k} differs after resume"


def test_resume_of_a_finished_epoch_continues_at_next(tmp_path):
    first = Trainer(make_cfg(tmp_path / "a", **{"train.epochs": 1}), quiet=True)
    first.fit()
    again = Trainer(make_cfg(tmp_path / "a"), resume=str(tmp_path / "a" / "checkpoint.pth"), quiet=True)
    assert (again.epoch, again.step_in_epoch) == (1, 0)


def test_atomic_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pth"
    atomic_save({"epoch": 1, "w": torch.ones(3)}, path)

    def crash(obj, f, *a, **k):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        atomic_save({"epoch": 2, "w": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert load_checkpoint_file(path)["epoch"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pth"]  # no temporary left


def test_keeps_last_k_and_best(tmp_path):
    keeper = CheckpointKeeper(tmp_path, keep_last=2)
    for epoch, best in [(1, True), (2, False), (3, True), (4, False)]:
        keeper.save({"epoch": epoch}, epoch_end=True, is_best=best)
    names = sorted(p.name for p in tmp_path.iterdir())
    # named as the log counts epochs: the end of the 4th epoch (state epoch 4) is epoch 3
    assert names == ["checkpoint.pth", "checkpoint_best.pth", "checkpoint_epoch0002.pth", "checkpoint_epoch0003.pth"]
    assert torch.load(tmp_path / "checkpoint_epoch0003.pth")["epoch"] == 4
    assert torch.load(tmp_path / "checkpoint_best.pth")["epoch"] == 3


def poison_loss(criterion, at_call: int):
    original = criterion.forward
    count = {"n": 0}

    def forward(outputs, targets):
        losses = original(outputs, targets)
        count["n"] += 1
        if count["n"] == at_call:
            losses["loss_giou"] = losses["loss_giou"] * float("nan")
        return losses

    criterion.forward = forward


def test_nan_loss_stops_with_iteration_and_term(tmp_path):
    trainer = Trainer(make_cfg(tmp_path / "nan"), quiet=True)
    poison_loss(trainer.criterion, at_call=2)
    with pytest.raises(NonFiniteLossError) as info:
        trainer.fit()
    msg = str(info.value)
    assert "epoch 0, iteration 1" in msg and "loss_giou=nan" in msg and "skip_nonfinite" in msg


def test_nan_loss_skipped_when_configured(tmp_path, capsys):
    trainer = Trainer(make_cfg(tmp_path / "skip", **{"train.skip_nonfinite": "true", "train.epochs": 1}))
    poison_loss(trainer.criterion, at_call=2)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.fit()
    assert "skipping batch: non-finite loss" in capsys.readouterr().out
    assert trainer.global_step == 3
    assert any(not torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())
    assert all(torch.isfinite(v).all() for v in trainer.model.state_dict().values() if v.is_floating_point())
