"""Every tool fails cleanly: a missing file, a malformed config value and a corrupt checkpoint give
one ``error:`` line and exit code 1, never a traceback (unless ``--debug`` / DETR_IRPE_DEBUG=1)."""
import os
import subprocess
import sys

import pytest
import torch

from helpers import COCO, REPO, tiny_overrides, tool
from detr_irpe.apps.cli import COMMANDS


@pytest.fixture(scope="module")
def corrupt(tmp_path_factory):
    path = tmp_path_factory.mktemp("corrupt") / "cut.pth"
    torch.save({"model": {"w": torch.zeros(1000)}}, path)
    path.write_bytes(path.read_bytes()[:300])
    return path


@pytest.fixture(scope="module")
def not_checkpoints(tmp_path_factory):
    """A checkpoint whose unpickling would run a shell command, and a config passed as a checkpoint."""
    class RunsAShellCommand:
        def __reduce__(self):
            return os.system, ("echo pwned",)

    folder = tmp_path_factory.mktemp("not_checkpoints")
    torch.save({"model": {"w": torch.zeros(2)}, "args": RunsAShellCommand()}, folder / "malicious.pth")
    (folder / "config.yaml").write_text("model:\n  hidden_dim: 64\n")
    return folder


def cases(corrupt, good, tmp, not_checkpoints):
    """``(tool, argv, what the error names)`` for each tool and kind of bad input."""
    bad_lr = "train.lr=fast"
    data = [f"data.root={COCO}", "data.num_workers=0", "data.train_images=train2017",
            "data.train_annotations=annotations/instances_train2017.json"]
    img = str(COCO / "val2017")
    return [
        # a missing file
        ("train", ["--config", "nothere.yaml"], "config file not found"),
        ("eval", ["--checkpoint", "nothere.pth"], "checkpoint file not found"),
        ("predict", ["--checkpoint", "nothere.pth", img, "--out", str(tmp)], "checkpoint file not found"),
        ("visualize", ["boxes", "--checkpoint", "nothere.pth", "--val", "1", "--out", str(tmp)],
         "checkpoint file not found"),
        ("check_data", ["--config", "nothere.yaml"], "config file not found"),
        ("demo", ["--config", "nothere.yaml", "--data-root", str(tmp / "data")], "config file not found"),
        ("pretrain_backbone", ["--config", "nothere.yaml", "--out", str(tmp / "b.pth")], "config file not found"),
        ("plot_logs", [str(tmp / "log.jsonl"), "--out", str(tmp / "c.png")], "no such log file"),
        ("convert_checkpoint", ["--to", "ours", "nothere.pth", str(tmp / "x.pth")], "checkpoint file not found"),
        ("export", ["--checkpoint", "nothere.pth", "--out", str(tmp / "m.onnx")], "checkpoint file not found"),
        ("predict", ["--onnx", str(tmp / "nothere.onnx"), img, "--out", str(tmp)], "no ONNX model"),
        ("predict", ["--onnx", str(corrupt), img, "--out", str(tmp)], "no sidecar JSON"),
        ("eval", ["--checkpoint", str(corrupt), "--data-root", str(tmp / "nowhere")], "corrupt or truncated"),
        ("train", ["--config", "demo", *data, "data.train_annotations=nothere.json"], "not found"),
        # a malformed config value
        ("train", ["--config", "demo", bad_lr], "train.lr"),
        ("eval", ["--checkpoint", str(good), bad_lr], "train.lr"),
        ("predict", ["--checkpoint", str(good), img, "--out", str(tmp), bad_lr], "train.lr"),
        ("visualize", ["rpe", "--checkpoint", str(good), bad_lr, "--out", str(tmp)], "train.lr"),
        ("check_data", ["--config", "demo", bad_lr], "train.lr"),
        ("export", ["--checkpoint", str(good), "--out", str(tmp / "m.onnx"), bad_lr], "train.lr"),
        ("export", ["--checkpoint", str(good), "--out", str(tmp / "m.onnx"), "--opset", "12"], "opset 12"),
        ("demo", ["--data-root", str(tmp / "data"), bad_lr], "train.lr"),
        ("pretrain_backbone", ["--config", "demo", "--out", str(tmp / "b.pth"), bad_lr], "train.lr"),
        ("train", ["--config", "demo", "model.rpe=rpe-2.0-spiral-ctx-1-k"], "unknown method 'spiral'"),
        ("train", ["--config", "demo", "train.lr=.inf"], "train.lr: expected a finite number"),
        # a corrupt checkpoint, or none at all
        ("eval", ["--checkpoint", str(corrupt)], "corrupt or truncated"),
        ("eval", ["--checkpoint", str(not_checkpoints / "malicious.pth")],
         f"its pickle names '{os.system.__module__}.system'"),
        ("eval", ["--checkpoint", str(not_checkpoints / "config.yaml")], "config.yaml is not a PyTorch checkpoint"),
        ("convert_checkpoint", ["--to", "hf", str(corrupt), str(tmp / "hf")], "corrupt or truncated"),
        ("predict", ["--checkpoint", str(corrupt), img, "--out", str(tmp)], "corrupt or truncated"),
        ("export", ["--checkpoint", str(corrupt), "--out", str(tmp / "m.onnx")], "corrupt or truncated"),
        ("visualize", ["attention", "--checkpoint", str(corrupt), "--val", "1", "--out", str(tmp)],
         "corrupt or truncated"),
        ("train", [*tiny_overrides(tmp / "run"), f"train.pretrained={corrupt}"], "corrupt or truncated"),
        ("train", ["--resume", str(corrupt), *tiny_overrides(tmp / "run")], "corrupt or truncated"),
        ("pretrain_backbone", ["--config", "demo", "--out", str(tmp / "b.pth"), *data,
                               f"model.backbone_weights={corrupt}"], "could not be read"),
    ]


def test_every_tool_is_covered(corrupt, tiny_checkpoint, tmp_path, not_checkpoints):
    named = {name.replace("_", "-") for name, _, _ in cases(corrupt, tiny_checkpoint, tmp_path, not_checkpoints)}
    scripts = {p.stem.replace("_", "-") for p in (REPO / "tools").glob("*.py")}
    assert named == set(COMMANDS) == scripts


def test_bad_input_gives_one_error_line(corrupt, tiny_checkpoint, tmp_path, not_checkpoints, capsys):
    for name, argv, names in cases(corrupt, tiny_checkpoint, tmp_path, not_checkpoints):
        code = tool(name).main(argv)
        out, err = capsys.readouterr()
        where = f"tools/{name}.py {' '.join(argv)}"
        assert code == 1, f"{where}: exit {code}\n{err}"
        assert err.startswith("error: ") and names in err, f"{where}:\n{err}"
        assert "Traceback" not in err + out, f"{where}:\n{err}"


def test_a_real_interpreter_prints_one_line_and_exits_1(tmp_path):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("DETR_IRPE_DEBUG", None)
    cmd = [sys.executable, str(REPO / "tools" / "eval.py"), "--checkpoint", str(tmp_path / "nothere.pth")]
    plain = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    assert plain.returncode == 1 and plain.stdout == ""
    assert plain.stderr.startswith("error: checkpoint file not found") and len(plain.stderr.splitlines()) == 1


def test_debugging_raises_the_error_itself(tmp_path, monkeypatch):
    from detr_irpe.errors import CheckpointNotFoundError

    argv = ["--checkpoint", str(tmp_path / "nothere.pth")]
    with pytest.raises(CheckpointNotFoundError):
        tool("eval").main(argv + ["--debug"])
    monkeypatch.setenv("DETR_IRPE_DEBUG", "1")
    with pytest.raises(CheckpointNotFoundError):
        tool("eval").main(argv)


def test_console_script_names_the_same_commands():
    from detr_irpe.apps.cli import build_parser

    help_text = build_parser().format_help()
    for name in ("train", "eval", "predict", "visualize", "export", "check-data", "demo"):
        assert name in help_text
