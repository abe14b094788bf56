"""Checkpoint files: the official format, refusing code, corrupt files, strict loading, fine-tuning."""
import argparse
import os
import pickle
import urllib.error

import pytest
import torch

from detr_irpe.engine.checkpoint import (CheckpointError, load_checkpoint_file, load_for_finetuning,
                                         load_model_weights, state_dict_from_checkpoint)
from detr_irpe.interop.hf_weights import check_fits
from detr_irpe.models import build_detr
from helpers import TINY

RPE = "rpe-2.0-product-ctx-1-k"


class NotATensor:
    """A class that only arbitrary-code unpickling could rebuild."""

    def __init__(self):
        self.value = 1


class RunsAShellCommand:
    """What a malicious checkpoint holds: unpickling it calls ``os.system(command)``."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


WRITERS = {  # how a file may hold a pickle: torch.save's zip, its legacy stream, a bare pickle (STACK_GLOBAL)
    "zip": lambda obj, path: torch.save(obj, path),
    "legacy": lambda obj, path: torch.save(obj, path, _use_new_zipfile_serialization=False),
    "pickle protocol 4": lambda obj, path: path.write_bytes(pickle.dumps(obj, protocol=4)),
}


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return build_detr(**{**TINY, **overrides})[0]


def save_official_format(path, model, args=None, zipped=True):
    """A file as the DETR / iRPE training scripts write it (``zipped=False``: before PyTorch 1.6)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "lr_scheduler": torch.optim.lr_scheduler.StepLR(optimizer, 100).state_dict(), "epoch": 149,
                "args": args if args is not None else argparse.Namespace(lr=1e-4, backbone="resnet50", rpe=None)},
               path, _use_new_zipfile_serialization=zipped)


def same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("zipped", [True, False])
def test_official_format_round_trip(tmp_path, zipped):
    source = tiny_model(seed=0)
    save_official_format(tmp_path / "checkpoint.pth", source, zipped=zipped)
    checkpoint = load_checkpoint_file(tmp_path / "checkpoint.pth")
    assert isinstance(checkpoint["args"], argparse.Namespace) and checkpoint["epoch"] == 149
    target = tiny_model(seed=1)
    assert not same_weights(source, target)
    report = load_model_weights(target, state_dict_from_checkpoint(checkpoint))
    assert same_weights(source, target)
    assert report.loaded == sorted(source.state_dict()) and not report.missing and not report.unexpected


def test_arbitrary_classes_are_refused(tmp_path):
    save_official_format(tmp_path / "evil.pth", tiny_model(), args=NotATensor())
    with pytest.raises(CheckpointError) as info:
        load_checkpoint_file(tmp_path / "evil.pth")
    message = str(info.value)
    assert "refusing to load" in message and "NotATensor" in message
    assert "weights_only=True" in message and "argparse.Namespace" in message


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # torch's, about the bare pickle
@pytest.mark.parametrize("how", WRITERS)
def test_a_checkpoint_that_would_run_code_is_refused_naming_the_function(tmp_path, how):
    marker = tmp_path / "pwned"
    WRITERS[how]({"model": {"w": torch.zeros(2)}, "args": RunsAShellCommand(f'echo pwned > "{marker}"')},
                 tmp_path / "evil.pth")
    with pytest.raises(CheckpointError) as info:
        load_checkpoint_file(tmp_path / "evil.pth")
    message = str(info.value)
    assert f"refusing to load {tmp_path / 'evil.pth'}: its pickle names '{os.system.__module__}.system'" in message
    assert "arbitrary code" in message and ".safetensors" in message
    assert "weights_only=False" not in message and "corrupt" not in message
    assert not marker.exists()


@pytest.mark.parametrize("name,content,looks", [
    ("config.yaml", b"model:\n  rpe: rpe-2.0-product-ctx-1-k\n  hidden_dim: 256\n",
     "text (YAML, JSON or similar) starting with 'model:\\n  rpe: rpe-2.0-product-ctx-1-k\\n  '...;"),
    ("weights.json", b'{"model": {"w": [0.0]}}', "text (YAML, JSON or similar) starting with '{\"model\": {\"w\": [0.0]}}';"),
    ("picture.png", b"\x89PNG\r\n\x1a\n" + bytes(32), "a PNG image;"),
    ("photo.jpg", b"\xff\xd8\xff\xe0" + bytes(32), "a JPEG image;"),
    ("empty.pth", b"", "empty (0 bytes);"),
    ("noise.pth", bytes(range(1, 40)), "binary data starting with the bytes 01 02 03 04 05 06 07 08;"),
])
def test_a_file_that_is_not_a_checkpoint_says_what_it_is(tmp_path, name, content, looks):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint_file(tmp_path / name)
    message = str(info.value)
    assert f"{name} is not a PyTorch checkpoint: it is {looks}" in message
    assert "run code" not in message and "weights_only=False" not in message


@pytest.mark.parametrize("keep", [0.5, 0.98])
def test_truncated_file_is_reported_as_corrupt(tmp_path, keep):
    save_official_format(tmp_path / "full.pth", tiny_model())
    data = (tmp_path / "full.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(CheckpointError, match=r"cut.pth is corrupt or truncated .* Download or save it again"):
        load_checkpoint_file(tmp_path / "cut.pth")


def test_other_unreadable_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint file not found: .*nope.pth"):
        load_checkpoint_file(tmp_path / "nope.pth")
    torch.save([torch.zeros(1)], tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match="holds a list, expected a dict"):
        load_checkpoint_file(tmp_path / "list.pth")


def test_url_download_offline(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(CheckpointError, match="could not download https://example.org/detr-r50.pth .* local path"):
        load_checkpoint_file("https://example.org/detr-r50.pth")
    # an already downloaded file is read from torch hub's checkpoint directory
    (tmp_path / "checkpoints").mkdir(exist_ok=True)
    save_official_format(tmp_path / "checkpoints" / "detr-r50.pth", tiny_model())
    assert "model" in load_checkpoint_file("https://example.org/detr-r50.pth")


def test_state_dict_from_checkpoint_forms():
    sd = tiny_model().state_dict()
    assert state_dict_from_checkpoint({"model": sd}).keys() == sd.keys()
    assert state_dict_from_checkpoint(sd).keys() == sd.keys()
    assert state_dict_from_checkpoint({f"module.{k}": v for k, v in sd.items()}).keys() == sd.keys()
    with pytest.raises(CheckpointError, match="no model state dict"):
        state_dict_from_checkpoint({"epoch": 3, "args": argparse.Namespace()})


def test_strict_loading_lists_what_differs():
    sd = tiny_model(num_classes=7).state_dict()
    sd.pop("query_embed.weight")
    sd["extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError) as info:
        load_model_weights(tiny_model(), sd, source="other.pth")
    message = str(info.value)
    assert message.startswith("cannot load weights (other.pth): the checkpoint does not fit this model")
    assert "missing from the checkpoint (1):\n    query_embed.weight" in message
    assert "unexpected in the checkpoint (not in the model) (1):\n    extra.weight" in message
    assert "class_embed.weight: model expects [5, 32], checkpoint has [8, 32]" in message
    assert "class_embed.bias: model expects [5], checkpoint has [8]" in message
    assert "load_for_finetuning" in message


def test_checkpoints_and_hugging_face_weights_list_what_differs_in_the_same_words():
    sd = tiny_model(num_classes=7).state_dict()
    sd.pop("query_embed.weight")
    sd["extra.weight"] = torch.zeros(1)
    sd["backbone.0.body.stage0.bn.num_batches_tracked"] = torch.tensor(3)  # a batch-norm counter is no difference
    model = tiny_model()
    with pytest.raises(CheckpointError) as loading:
        load_model_weights(model, sd)
    with pytest.raises(CheckpointError) as hugging_face:
        check_fits(sd, {k: tuple(v.shape) for k, v in model.state_dict().items()}, "folder")
    lists = [str(e.value).split("\n", 1)[1].split("\n  hint:")[0] for e in (loading, hugging_face)]
    assert lists[0] == lists[1] == (
        "  missing from the checkpoint (1):\n    query_embed.weight"
        "\n  unexpected in the checkpoint (not in the model) (1):\n    extra.weight"
        "\n  shape mismatches (2):\n    class_embed.bias: model expects [5], checkpoint has [8]"
        "\n    class_embed.weight: model expects [5, 32], checkpoint has [8, 32]")


def test_long_lists_of_keys_show_twenty_and_count_the_rest():
    model = tiny_model()
    with pytest.raises(CheckpointError) as info:
        load_model_weights(model, {})
    keys = len(model.state_dict())
    assert f"missing from the checkpoint ({keys}):" in str(info.value)
    assert str(info.value).count("\n    ") == 20 + 1 and f"... and {keys - 20} more" in str(info.value)


def test_mismatch_hints_say_what_to_type_on_the_command_line():
    with pytest.raises(CheckpointError) as classes:
        load_model_weights(tiny_model(), tiny_model(num_classes=7).state_dict())
    with pytest.raises(CheckpointError) as tables:
        load_model_weights(tiny_model(rpe=RPE), tiny_model().state_dict())
    assert "hint: class_embed / query_embed differ (another num_classes / num_queries): to fine-tune, pass the " \
           "checkpoint as train.pretrained=PATH, which re-initialises those heads" in str(classes.value)
    assert "hint: only iRPE tables are missing: to start an iRPE model from a plain DETR checkpoint, pass it as " \
           "train.pretrained=PATH, which starts the missing tables at zero" in str(tables.value)
    assert all("(in Python: load_for_finetuning)" in str(e.value) for e in (classes, tables))


def test_irpe_checkpoint_into_plain_model_names_the_tables():
    sd = tiny_model(rpe=RPE).state_dict()
    with pytest.raises(CheckpointError, match=r"(?s)transformer.encoder.layers.0.self_attn.rpe_k.lookup_table_weight"
                                              r".*build the model with the matching rpe spec"):
        load_model_weights(tiny_model(), sd)
    with pytest.raises(CheckpointError, match="cannot fine-tune"):
        load_for_finetuning(tiny_model(), sd)


def test_non_strict_loading_reports_missing_and_unexpected():
    sd = tiny_model().state_dict()
    sd.pop("class_embed.bias")
    sd["extra.weight"] = torch.zeros(1)
    report = load_model_weights(tiny_model(seed=3), sd, strict=False)
    assert report.missing == ["class_embed.bias"] and report.unexpected == ["extra.weight"]


def test_finetune_to_another_number_of_classes(tmp_path):
    source = tiny_model(seed=0, num_classes=4)
    save_official_format(tmp_path / "coco.pth", source)
    target = tiny_model(seed=1, num_classes=2)
    fresh_head = target.class_embed.weight.clone()
    report = load_for_finetuning(target, state_dict_from_checkpoint(load_checkpoint_file(tmp_path / "coco.pth")))
    assert report.skipped == ["class_embed.bias", "class_embed.weight"]
    assert report.initialised == []
    assert target.class_embed.weight.shape == (3, 32) and not torch.equal(target.class_embed.weight, fresh_head)
    src, dst = source.state_dict(), target.state_dict()
    assert all(torch.equal(src[k], dst[k]) for k in dst if not k.startswith("class_embed"))
    assert "class_embed.weight" in str(report)


def test_finetune_to_another_number_of_queries():
    source = tiny_model(seed=0)
    target = tiny_model(seed=1, num_queries=9)
    report = load_for_finetuning(target, source.state_dict())
    assert report.skipped == ["query_embed.weight"] and report.initialised == []
    with pytest.raises(CheckpointError, match="input_proj.weight: model expects"):  # not a head: still an error
        load_for_finetuning(tiny_model(hidden_dim=64), source.state_dict())


def test_irpe_model_from_a_plain_checkpoint():
    plain = tiny_model(seed=0)
    irpe = tiny_model(seed=1, rpe="rpe-1.9-product-ctx-0-qkv")
    with torch.no_grad():
        for name, p in irpe.named_parameters():
            if "lookup_table" in name:
                p.fill_(1.0)  # the report must come from zeroing them, not from the build
    report = load_for_finetuning(irpe, plain.state_dict())
    expected = sorted(f"transformer.encoder.layers.0.self_attn.rpe_{x}.lookup_table_weight" for x in "qkv")
    assert report.initialised == expected and report.skipped == []
    assert report.loaded == sorted(plain.state_dict())
    plain.eval(), irpe.eval()
    images = [torch.randn(3, 64, 96)]
    with torch.no_grad():
        torch.testing.assert_close(irpe(images)["pred_logits"], plain(images)["pred_logits"])
    assert "iRPE tables at zero" in str(report)
