"""Nothing lost, ever: through the command-line tools as a user runs them (a tiny model on the COCO
images of tests/data), no file the user had changes unless asked, a trained epoch survives any later
failure, a stopped run exits non-zero, and each failure is one ``error:`` line naming what to do.

Every case snapshots the user's files (bytes) before the command and compares after it."""
import errno
import io
import json
import os
import shutil
import signal
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import detr_irpe.engine.train as train_module
import detr_irpe.files as files_module
from helpers import COCO, REPO, run_python, save_tiny_checkpoint, tiny_overrides, tool

VAL_IMAGE = "000000223747.jpg"


def snapshot(*folders) -> dict:
    """``{path: bytes}`` of every file under ``folders``."""
    return {str(p): p.read_bytes() for folder in folders for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def run(name, *argv, capsys):
    """``tools/<name>.py argv`` in this process: ``(exit code, stdout, stderr)``."""
    code = tool(name).main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(err: str, *fragments: str) -> str:
    """The ``error:`` line of ``err`` (on a line of its own), which must name every fragment."""
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    assert "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    return lines[0]


def quick(out, **extra):
    """Overrides for a run of one iteration per epoch, evaluated once."""
    return tiny_overrides(out, **{"train.epochs": 1, "train.max_iters_per_epoch": 1, "train.deterministic": "false",
                                  **extra})


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished one-epoch run (checkpoint, log, metrics) made by tools/train.py."""
    out = tmp_path_factory.mktemp("trained") / "run"
    assert tool("train").main(quick(out)) == 0
    return out


@pytest.fixture
def coco(tmp_path):
    """A private copy of tests/data/coco that a test may damage."""
    return Path(shutil.copytree(COCO, tmp_path / "coco"))


# --- never overwrite what the user did not ask to overwrite ----------------------------------------

def test_predict_refuses_to_write_into_the_folder_of_its_inputs(tmp_path, tiny_checkpoint, capsys):
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.open(COCO / "val2017" / VAL_IMAGE).save(photos / "holiday.png")
    before = snapshot(photos)
    code, _, err = run("predict", "--checkpoint", tiny_checkpoint, photos, "--out", photos, capsys=capsys)
    assert code == 1
    one_error_line(err, "is the folder of the input images", str(photos / "predictions"))
    assert snapshot(photos) == before
    code, _, err = run("predict", "--checkpoint", tiny_checkpoint, photos, "--out", photos, "--overwrite",
                       capsys=capsys)  # not even when asked
    assert code == 1 and snapshot(photos) == before


def test_a_new_run_refuses_a_folder_that_holds_a_run(trained, capsys):
    before = snapshot(trained)
    code, _, err = run("train", *quick(trained), capsys=capsys)
    assert code == 1
    one_error_line(err, "already holds a training run", f"--resume {trained / 'checkpoint.pth'}",
                   f"train.output_dir={trained}-2")
    assert snapshot(trained) == before


def test_eval_writes_beside_the_checkpoint_it_was_given_never_into_the_run_it_came_from(trained, tmp_path, capsys):
    copy = tmp_path / "copies" / "COPY.pth"
    copy.parent.mkdir()
    shutil.copy(trained / "checkpoint.pth", copy)
    other = Path(shutil.copytree(COCO, tmp_path / "other"))
    before = snapshot(trained)
    code, out, _ = run("eval", "--checkpoint", copy, "--data-root", other, capsys=capsys)
    assert code == 0 and snapshot(trained) == before
    assert (copy.parent / "eval_COPY" / "metrics.json").is_file() and str(copy.parent / "eval_COPY") in out
    code, out, _ = run("eval", "--checkpoint", copy, "--data-root", other, capsys=capsys)  # again: a new folder
    assert code == 0 and (copy.parent / "eval_COPY-2" / "metrics.json").is_file()
    first = snapshot(copy.parent / "eval_COPY")
    code, _, err = run("eval", "--checkpoint", copy, "--data-root", other, "--output-dir", copy.parent / "eval_COPY",
                       capsys=capsys)
    assert code == 1 and snapshot(copy.parent / "eval_COPY") == first
    one_error_line(err, "metrics.json", "--overwrite")


def test_inputs_with_one_stem_get_one_picture_each(tmp_path, tiny_checkpoint, capsys):
    photos = tmp_path / "photos"
    photos.mkdir()
    image = Image.open(COCO / "val2017" / VAL_IMAGE)
    image.save(photos / "cat.jpg")
    image.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(photos / "cat.png")
    out = tmp_path / "pred"
    code, _, _ = run("predict", "--checkpoint", tiny_checkpoint, photos, "--out", out, "--threshold", 0, capsys=capsys)
    assert code == 0
    entries = json.loads((out / "detections.json").read_text())
    assert sorted(Path(e["picture"]).name for e in entries) == ["cat_jpg.png", "cat_png.png"]
    assert {Path(e["file"]).name: Path(e["picture"]).name for e in entries} == {"cat.jpg": "cat_jpg.png",
                                                                                "cat.png": "cat_png.png"}
    pictures = [np.asarray(Image.open(out / name)) for name in ("cat_jpg.png", "cat_png.png")]
    assert not np.array_equal(*pictures)  # two pictures, neither written over the other


def test_predict_again_into_the_same_folder_needs_overwrite(tmp_path, tiny_checkpoint, capsys):
    out = tmp_path / "pred"
    image = COCO / "val2017" / VAL_IMAGE
    assert run("predict", "--checkpoint", tiny_checkpoint, image, "--out", out, capsys=capsys)[0] == 0
    before = snapshot(out)
    code, _, err = run("predict", "--checkpoint", tiny_checkpoint, image, "--out", out, "--threshold", 0,
                       capsys=capsys)
    assert code == 1 and snapshot(out) == before
    one_error_line(err, "already", "detections.json", "--overwrite")
    assert run("predict", "--checkpoint", tiny_checkpoint, image, "--out", out, "--threshold", 0, "--overwrite",
               capsys=capsys)[0] == 0
    assert snapshot(out) != before


def test_no_command_writes_over_its_own_input(trained, tmp_path, tiny_checkpoint, capsys):
    checkpoint = tmp_path / "model.pth"
    shutil.copy(tiny_checkpoint, checkpoint)
    log = tmp_path / "log.jsonl"
    shutil.copy(trained / "log.jsonl", log)
    before = snapshot(tmp_path)
    for name, argv in [
        ("export", ["--checkpoint", checkpoint, "--out", checkpoint, "--format", "torch-export", "--overwrite"]),
        ("convert_checkpoint", ["--to", "ours", checkpoint, checkpoint, "--overwrite"]),
        ("plot_logs", [log, "--out", log, "--overwrite"]),
        ("pretrain_backbone", ["--config", "demo", "--out", checkpoint]),
    ]:
        code, _, err = run(name, *argv, capsys=capsys)
        assert code == 1, (name, err)
        one_error_line(err)
        assert snapshot(tmp_path) == before, name


def test_a_run_folder_works_as_a_log_for_the_curves(trained, tmp_path, capsys):
    code, out, _ = run("plot_logs", trained, "--out", tmp_path / "curves.png", capsys=capsys)
    assert code == 0 and (tmp_path / "curves.png").stat().st_size > 1000


# --- never lose a trained epoch ---------------------------------------------------------------------

def test_a_missing_image_is_named_before_any_training(coco, tmp_path, capsys):
    (coco / "val2017" / VAL_IMAGE).unlink()
    out = tmp_path / "run"
    code, _, err = run("train", *quick(out, **{"data.root": coco}), capsys=capsys)
    assert code == 1
    one_error_line(err, "1 of the 6 val images", VAL_IMAGE, "check-data")
    assert not (out / "checkpoint.pth").exists()


def test_a_failed_evaluation_keeps_the_epoch_and_resume_completes_it(coco, tmp_path, capsys):
    image = coco / "val2017" / VAL_IMAGE
    good = image.read_bytes()
    image.write_bytes(good[: len(good) // 3])  # truncated: found only when evaluation decodes it
    out = tmp_path / "run"
    code, _, err = run("train", *quick(out, **{"data.root": coco}), capsys=capsys)
    assert code == 1
    one_error_line(err, VAL_IMAGE)
    saved = torch.load(out / "checkpoint.pth", weights_only=True)
    assert saved["epoch"] == 1 and saved["pending_epoch"]["evaluate"]  # trained, saved, not yet evaluated
    assert not (out / "log.jsonl").exists()

    image.write_bytes(good)
    code, stdout, _ = run("train", "--resume", out / "checkpoint.pth", capsys=capsys)
    assert code == 0, stdout
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [0] and "val_AP" in log[0]  # the epoch logged once, with its AP
    assert (out / "metrics.json").is_file() and (out / "checkpoint_best.pth").is_file()
    code, stdout, _ = run("train", "--resume", out / "checkpoint.pth", capsys=capsys)
    assert code == 0 and "finished run" in stdout and "train.epochs=N" in stdout


def test_a_full_disk_keeps_the_previous_checkpoint_and_says_so(trained, tmp_path, capsys, monkeypatch):
    run_dir = Path(shutil.copytree(trained, tmp_path / "run"))
    before = snapshot(run_dir)
    real_fdopen = os.fdopen

    class FullDisk(io.RawIOBase):
        """A file on a disk that fills up after 50 kB: write() fails with ENOSPC, as the kernel says."""

        def __init__(self, file):
            self.file, self.written = file, 0

        def writable(self):
            return True

        def write(self, data):
            if self.written + len(data) > 50_000:  # config.yaml fits, a checkpoint does not
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            self.written += len(data)
            return self.file.write(data)

        def flush(self):
            self.file.flush()

        def fileno(self):
            return self.file.fileno()

        def close(self):
            self.file.close()

    monkeypatch.setattr(files_module.os, "fdopen", lambda fd, mode: FullDisk(real_fdopen(fd, mode)))
    code, _, err = run("train", "--resume", run_dir / "checkpoint.pth", "train.epochs=2", capsys=capsys)
    monkeypatch.undo()
    assert code == 1
    line = one_error_line(err, "checkpoint.pth", "the disk is full", "free on the disk holding", "is unchanged")
    assert "enforce fail" not in line
    after = snapshot(run_dir)
    for name in ("checkpoint.pth", "log.jsonl", "checkpoint_best.pth"):
        assert after[str(run_dir / name)] == before[str(run_dir / name)], name  # the epoch is not logged either
    assert not [p for p in run_dir.iterdir() if p.name.endswith(".tmp")]


def test_sigterm_saves_then_exits_with_128_plus_the_signal(tmp_path, capsys, monkeypatch):
    real_step = train_module.train_step
    calls = {"n": 0}

    def step_then_sigterm(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # as a scheduler preempting the job
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train_module, "train_step", step_then_sigterm)
    out = tmp_path / "run"
    code, _, err = run("train", *quick(out, **{"train.max_iters_per_epoch": 2}), capsys=capsys)
    assert code == 128 + signal.SIGTERM
    assert f"stopped by SIGTERM at epoch 0, iteration 1: checkpoint saved to {out / 'checkpoint.pth'}" in err
    assert f"--resume {out / 'checkpoint.pth'}" in err
    assert torch.load(out / "checkpoint.pth", weights_only=True)["step_in_epoch"] == 1
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


# --- a number is never silently meaningless ---------------------------------------------------------

def test_eval_warns_when_the_classes_are_not_the_annotations(tmp_path, capsys):
    three = save_tiny_checkpoint(tmp_path / "three.pth", categories={1: "circle", 2: "square", 3: "triangle"})
    code, _, err = run("eval", "--checkpoint", three, "--output-dir", tmp_path / "eval", capsys=capsys)
    assert code == 0
    warning = [line for line in err.splitlines() if line.startswith("warning: ")]
    assert len(warning) == 1 and "id 1 is 'circle' for the model, 'person' in the annotations" in warning[0]
    assert "categories (ids" in warning[0] and "their AP is 0" in warning[0]
    assert "measures nothing" in json.loads((tmp_path / "eval" / "metrics.json").read_text())["warnings"][0]
    code, _, err = run("eval", "--checkpoint", three, "--output-dir", tmp_path / "strict", "--strict", capsys=capsys)
    assert code == 1 and not (tmp_path / "strict" / "metrics.json").exists()
    one_error_line(err, "'circle' for the model")


def test_training_says_how_many_boxes_it_drops_and_why(coco, tmp_path, capsys):
    path = coco / "annotations" / "instances_train2017.json"
    data = json.loads(path.read_text())
    data["annotations"][0]["bbox"][2] = -5.0  # negative width
    data["annotations"][1]["bbox"][3] = 0.0  # zero height
    data["annotations"][2]["bbox"][:2] = [5000.0, 5000.0]  # outside its image
    path.write_text(json.dumps(data))
    code, out, _ = run("train", *quick(tmp_path / "run", **{"data.root": coco}), capsys=capsys)
    assert code == 0
    note = [line for line in out.splitlines() if "dropped while loading" in line]
    assert len(note) == 1
    assert (f"3 of its {len(data['annotations'])} boxes are dropped while loading (1 with a negative width or "
            f"height, 1 with zero width or height, 1 entirely outside their image)") in note[0]
    assert "check-data --annotations" in note[0]


# --- one error line for each failure ----------------------------------------------------------------

def test_an_output_path_that_is_a_file_is_one_error_line(tmp_path, tiny_checkpoint, capsys):
    taken = tmp_path / "notes.txt"
    taken.write_text("my notes")
    code, _, err = run("train", *quick(taken), capsys=capsys)
    assert code == 1
    one_error_line(err, "train.output_dir", "is a file, not a folder")
    code, _, err = run("predict", "--checkpoint", tiny_checkpoint, COCO / "val2017" / VAL_IMAGE, "--out", taken,
                       capsys=capsys)
    assert code == 1
    one_error_line(err, "--out", "is a file, not a folder")
    assert taken.read_text() == "my notes"


def test_a_bad_train_image_in_a_worker_is_one_line_on_its_own(coco, tmp_path, capsys):
    bad = sorted((coco / "train2017").glob("*.jpg"))[0]
    bad.write_bytes(b"not a jpeg")
    code, _, err = run("train", *quick(tmp_path / "run", **{"data.root": coco, "data.num_workers": 1,
                                                            "train.max_iters_per_epoch": 3}), capsys=capsys)
    assert code == 1
    line = one_error_line(err, bad.name)
    assert "Caught" not in err and "worker process" not in err and "Original Traceback" not in line
    assert err.replace("\r", "\n").split("error: ")[0].endswith("\n") or err.startswith("error: ")


def test_device_errors_name_the_option_the_user_gave(tiny_checkpoint, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, _, err = run("eval", "--checkpoint", tiny_checkpoint, "--device", "cuda", capsys=capsys)
    assert code == 1
    line = one_error_line(err, "--device cuda", "no CUDA GPU")
    assert "train.device" not in line


def test_a_checkpoint_of_other_classes_points_at_train_pretrained(tiny_checkpoint, tmp_path, capsys):
    code, _, err = run("eval", "--checkpoint", tiny_checkpoint, "--output-dir", tmp_path / "e", "model.num_classes=9",
                       capsys=capsys)
    assert code == 1
    assert "hint: class_embed / query_embed differ" in err and "pass the checkpoint as train.pretrained=PATH" in err
    assert "Traceback" not in err


def test_checkpoints_get_the_permissions_the_umask_gives(tmp_path, capsys):
    previous = os.umask(0o027)
    try:
        code, _, _ = run("train", *quick(tmp_path / "run"), capsys=capsys)
    finally:
        os.umask(previous)
    assert code == 0
    for name in ("checkpoint.pth", "checkpoint_best.pth", "checkpoint_epoch0000.pth", "metrics.json", "config.yaml"):
        assert stat.S_IMODE((tmp_path / "run" / name).stat().st_mode) == 0o640, name


DRIVER = r"""
import ctypes, json, os, resource, sys
if os.geteuid() == 0:  # a new user namespace, so that root loses its power to write anywhere (as a user has none)
    if ctypes.CDLL(None, use_errno=True).unshare(0x10000000) != 0:  # CLONE_NEWUSER
        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWUSER)")
sys.path.insert(0, sys.argv[1])
from helpers import tool, tiny_overrides
readonly, checkpoint, image, big = sys.argv[2:6]
results = {}
for name, argv in [("train", tiny_overrides(os.path.join(readonly, "run"), **{"train.epochs": 1})),
                   ("predict", ["--checkpoint", checkpoint, image, "--out", os.path.join(readonly, "pred")])]:
    results[name] = tool(name).main(argv)
resource.setrlimit(resource.RLIMIT_FSIZE, (20000, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
results["file size"] = tool("train").main(tiny_overrides(big, **{"train.epochs": 1, "train.max_iters_per_epoch": 1}))
print(json.dumps(results))
"""


def test_read_only_folders_and_a_file_size_limit_are_one_error_line(tmp_path, tiny_checkpoint):
    readonly = tmp_path / "readonly"
    readonly.mkdir()
    readonly.chmod(0o555)
    proc = run_python(DRIVER, REPO / "tests", readonly, tiny_checkpoint, COCO / "val2017" / VAL_IMAGE, tmp_path / "big",
                      env={"OMP_NUM_THREADS": "1", "DETR_IRPE_DEBUG": ""})
    readonly.chmod(0o755)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.splitlines()[-1]) == {"train": 1, "predict": 1, "file size": 1}
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert "Traceback" not in proc.stderr and len(errors) == 3, proc.stderr
    assert "train.output_dir" in errors[0] and "no permission to write in" in errors[0]
    assert "--out" in errors[1] and "no permission to write in" in errors[1]
    assert "checkpoint.pth" in errors[2] and "largest file size allowed" in errors[2]
    assert not list(readonly.iterdir())
    assert not (tmp_path / "big" / "log.jsonl").exists()  # no epoch logged without its checkpoint
