"""A new user's first hour: the commands of the README do what they say, through the CLIs."""
import json

import pytest
import torch
import yaml

from helpers import COCO, run_python, tiny_overrides, tool


def run(name, *argv, capsys):
    code = tool(name).main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def quick(out, **extra):
    return tiny_overrides(out, **{"train.epochs": 1, "train.max_iters_per_epoch": 1, "train.deterministic": "false",
                                  **extra})


def test_train_honours_the_configs_backbone_pretraining(tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, _ = run("train", *quick(out, **{"train.pretrain_iterations": 2, "train.pretrain_batch_size": 2,
                                                  "train.pretrain_target": "cells"}), capsys=capsys)
    assert code == 0
    assert "backbone pretrained on which categories cover each feature cell: 2 iterations" in stdout
    assert (out / "backbone_pretrained.pth").is_file()
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["model"]["backbone_weights"] == str(out / "backbone_pretrained.pth")


def test_resume_continues_the_run_with_its_own_config_and_names_what_changed(tmp_path, capsys):
    out = tmp_path / "run"
    assert run("train", *quick(out, **{"model.num_queries": 4}), capsys=capsys)[0] == 0
    moved = tmp_path / "moved"
    out.rename(moved)  # the run's folder moved: resuming continues it where it is now
    code, stdout, _ = run("train", "--resume", moved / "checkpoint.pth", "train.epochs=2", "lr=5e-4", capsys=capsys)
    assert code == 0
    assert "resuming with changed settings:" in stdout
    assert "train.epochs: 1 -> 2" in stdout and "train.lr: 0.001 -> 0.0005" in stdout
    assert f"train.output_dir: '{out}' -> '{moved}'" in stdout
    log = [json.loads(line) for line in (moved / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [0, 1] and not out.exists()
    saved = torch.load(moved / "checkpoint.pth", weights_only=True)
    assert saved["epoch"] == 2 and saved["config"]["model"]["num_queries"] == 4  # the run's own model


def test_overrides_are_spelled_the_same_in_every_command(tmp_path, tiny_checkpoint, capsys):
    image = COCO / "val2017" / "000000223747.jpg"
    # before the files, after them, after an option: all are overrides of the one list
    for argv in ([image, "--out", tmp_path / "a", "model.num_queries=3"],
                 ["model.num_queries=3", image, "--out", tmp_path / "b"],
                 [image, "model.num_queries=3", "--out", tmp_path / "c", "--threshold", "0"]):
        code, _, err = run("predict", "--checkpoint", tiny_checkpoint, *argv, capsys=capsys)
        assert code == 1 and "num_queries" in err  # 3 queries do not fit the checkpoint's 5: the override was read


def test_help_is_plain_text_and_imports_only_its_command(tmp_path):
    probe = ("import sys; from detr_irpe.apps.cli import main\n"
             "try:\n    main(['export', '--help'])\nexcept SystemExit:\n    pass\n"
             "print('LOADED', sorted(m for m in sys.modules if m.startswith('detr_irpe.apps.commands.')))")
    proc = run_python(probe)
    text, loaded = proc.stdout.split("LOADED")
    assert "usage: detr-irpe export" in text and "`" not in text
    assert eval(loaded) == ["detr_irpe.apps.commands.export", "detr_irpe.apps.commands.options"]


def test_plot_logs_is_visualize_curves(tmp_path, capsys):
    from detr_irpe.apps.cli import COMMANDS

    assert COMMANDS["plot-logs"][1] == "curves"
    log = tmp_path / "run" / "log.jsonl"
    log.parent.mkdir()
    log.write_text("\n".join(json.dumps({"epoch": e, "train_loss": 3.0 - e, "val_AP": 0.1 * e}) for e in range(3)))
    assert run("plot_logs", log.parent, "--out", tmp_path / "a.png", capsys=capsys)[0] == 0
    assert run("visualize", "curves", log.parent, "--out", tmp_path / "b.png", capsys=capsys)[0] == 0
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()


def test_every_command_takes_overrides_as_key_value_arguments(capsys):
    from detr_irpe.apps.cli import COMMANDS, main

    pictures = [["visualize", kind] for kind in ("boxes", "attention", "rpe")]
    for argv in [[name] for name in COMMANDS if name != "visualize"] + pictures:
        with pytest.raises(SystemExit):
            main(argv + ["--help"])
        text = capsys.readouterr().out
        assert "--set" not in text and "`" not in text, argv
        if argv[0] not in ("plot-logs", "convert-checkpoint"):  # these read no config
            assert "KEY=VALUE" in text, argv
