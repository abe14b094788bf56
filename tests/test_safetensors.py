""".safetensors checkpoints: self-describing (config and categories in the metadata), read without pickle."""
import pickle

import pytest
import torch
from safetensors.torch import save_file

from detr_irpe.config import load_config
from detr_irpe.engine.checkpoint import load_checkpoint_file
from detr_irpe.engine.convert import convert_checkpoint
from detr_irpe.engine.inference import load_detector
from detr_irpe.errors import CheckpointError, UsageError
from detr_irpe.interop import load_safetensors, save_safetensors
from detr_irpe.models import build_detr

OVERRIDES = ["model.backbone=tiny", "model.backbone_weights=none", "model.hidden_dim=32", "model.nheads=2",
             "model.enc_layers=1", "model.dec_layers=1", "model.dim_feedforward=32", "model.num_queries=4",
             "model.num_classes=3", "model.rpe=rpe-2.0-product-ctx-1-k"]
CATEGORIES = {1: "person", 2: "bicycle"}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """``(config, model, path)``: an iRPE model with non-zero tables, saved with save_safetensors."""
    cfg = load_config(None, OVERRIDES)
    torch.manual_seed(0)
    model, _, _ = build_detr(cfg.model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lookup_table" in name:
                p.normal_()
    path = tmp_path_factory.mktemp("st") / "model.safetensors"
    assert save_safetensors(path, model.state_dict(), cfg.to_dict(), CATEGORIES) == path
    return cfg, model.eval(), path


def test_file_holds_weights_config_and_categories(saved):
    cfg, model, path = saved
    checkpoint = load_safetensors(path)
    assert checkpoint["config"] == cfg.to_dict() and checkpoint["categories"] == CATEGORIES
    state = model.state_dict()
    assert checkpoint["model"].keys() == state.keys()
    assert all(torch.equal(checkpoint["model"][k], v) for k, v in state.items())
    assert not list(path.parent.glob("*.tmp"))  # written next to it, then renamed


def test_loading_never_unpickles(saved, monkeypatch):
    cfg, model, path = saved

    def refuse(*args, **kwargs):
        raise AssertionError("unpickling was attempted")

    class NoUnpickler:
        def __init__(self, *args, **kwargs):
            refuse()

    for name in ("load", "loads"):
        monkeypatch.setattr(pickle, name, refuse)
    monkeypatch.setattr(pickle, "Unpickler", NoUnpickler)
    monkeypatch.setattr(torch, "load", refuse)
    detector = load_detector(str(path))  # the entry point of eval / predict / visualize
    assert detector.config.model.rpe == cfg.model.rpe and detector.categories == CATEGORIES
    loaded = detector.model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in model.state_dict().items())
    with pytest.raises(AssertionError, match="unpickling was attempted"):  # the patch is live
        pickle.loads(pickle.dumps(1))


def test_a_bare_state_dict_without_metadata_loads(saved, tmp_path):
    _, model, _ = saved
    save_file(model.state_dict(), tmp_path / "bare.safetensors")
    checkpoint = load_checkpoint_file(tmp_path / "bare.safetensors")
    assert set(checkpoint) == {"model"} and checkpoint["model"].keys() == model.state_dict().keys()


@pytest.mark.parametrize("keep", [0.0, 0.5, 0.99])
def test_truncated_file_is_reported_as_corrupt(saved, tmp_path, keep):
    data = saved[2].read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(CheckpointError, match=r"cut.safetensors is not a readable safetensors file .*Download or "
                                              r"save it again"):
        load_checkpoint_file(tmp_path / "cut.safetensors")


def test_transformers_weights_file_points_to_its_folder(tmp_path):
    save_file({"model.input_projection.weight": torch.zeros(2, 2)}, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="Hugging Face transformers DETR .* Pass the folder"):
        load_checkpoint_file(tmp_path / "model.safetensors")


def test_convert_pth_to_safetensors_and_back(saved, tmp_path):
    cfg, model, _ = saved
    torch.save({"model": model.state_dict(), "config": cfg.to_dict(), "categories": CATEGORIES, "epoch": 3},
               tmp_path / "run.pth")
    convert_checkpoint(tmp_path / "run.pth", tmp_path / "run.safetensors", "safetensors")
    convert_checkpoint(tmp_path / "run.safetensors", tmp_path / "again.pth", "ours")
    again = load_checkpoint_file(tmp_path / "again.pth")
    assert set(again) == {"model", "config", "categories"} and again["categories"] == CATEGORIES
    assert again["config"]["model"] == dict(cfg.to_dict()["model"], backbone_weights="none")
    assert all(torch.equal(again["model"][k], v) for k, v in model.state_dict().items())
    with pytest.raises(UsageError, match="name the output of --to safetensors \\*.safetensors"):
        convert_checkpoint(tmp_path / "run.pth", tmp_path / "run.pth2", "safetensors")


def test_weights_that_do_not_fit_their_config_are_not_converted(saved, tmp_path):
    cfg, model, _ = saved
    state = {k: v for k, v in model.state_dict().items() if "lookup_table" not in k}
    torch.save({"model": state, "config": cfg.to_dict()}, tmp_path / "no_tables.pth")
    with pytest.raises(CheckpointError, match="missing from the checkpoint .*\n.*lookup_table"):
        convert_checkpoint(tmp_path / "no_tables.pth", tmp_path / "out.safetensors", "safetensors")
    assert not (tmp_path / "out.safetensors").exists()
