"""predict on folders (subfolders named, or taken with ``recursive``; one picture per input, never
read back from the output folder; a progress bar), and the ONNX libraries loaded only when used.
The comparisons of ONNX with PyTorch are in test_export.py, beside the export they need."""
import io
import json
import shutil
import sys
import textwrap
from pathlib import Path

import pytest

from detr_irpe.apps.predict import SkippedImageWarning, expand_inputs, output_names, predict_path
from detr_irpe.data.images import list_images
from helpers import COCO, run_python

SMALL = COCO / "val2017" / "000000404484.jpg"  # 320 x 240


def photos(root: Path, *names: str) -> Path:
    """A folder holding a copy of a small COCO image at each of ``names`` (paths in the folder)."""
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(SMALL, root / name)
    return root


def run(checkpoint, inputs, out, **options):
    return predict_path(str(checkpoint), inputs, out, threshold=0.0, device="cpu", **options)


def test_a_folder_without_recursive_names_the_subfolders_it_skips(tiny_checkpoint, tmp_path):
    folder = photos(tmp_path / "photos", "cat.jpg", "a/cat.jpg", "b/deeper/dog.png")
    (folder / "empty").mkdir()
    (folder / "notes").mkdir()
    (folder / "notes" / "readme.txt").write_text("no images here")
    with pytest.warns(SkippedImageWarning) as caught:
        results = run(tiny_checkpoint, folder, tmp_path / "out")
    assert [r["file"] for r in results] == [str(folder / "cat.jpg")]
    notes = [str(w.message) for w in caught if issubclass(w.category, SkippedImageWarning)]
    assert notes == [f"skipped 2 subfolders of {folder}/ (a, b): pass --recursive to include them"]


def test_recursive_takes_the_images_of_subfolders_sorted_each_with_its_own_picture(tiny_checkpoint, tmp_path):
    folder = photos(tmp_path / "photos", "cat.jpg", "a/cat.jpg", "b/deeper/cat.jpg", "b/dog.png")
    out = tmp_path / "out"
    results = run(tiny_checkpoint, folder, out, recursive=True)
    files = ["a/cat.jpg", "b/deeper/cat.jpg", "b/dog.png", "cat.jpg"]
    assert [r["file"] for r in results] == [str(folder / f) for f in files]
    pictures = ["a_cat.png", "b_deeper_cat.png", "b_dog.png", "cat.png"]
    assert [r["picture"] for r in results] == [str(out / p) for p in pictures]
    assert sorted(p.name for p in out.iterdir()) == sorted(pictures + ["detections.json"])
    assert json.loads((out / "detections.json").read_text()) == results


def test_recursive_never_reads_the_pictures_of_its_output_folder(tiny_checkpoint, tmp_path):
    folder = photos(tmp_path / "photos", "cat.jpg", "a/dog.jpg")
    out = folder / "predictions"
    first = run(tiny_checkpoint, folder, out, recursive=True)
    again = run(tiny_checkpoint, folder, out, recursive=True, overwrite=True)  # its PNGs are now in photos/
    assert [r["file"] for r in again] == [r["file"] for r in first] == [str(folder / "a/dog.jpg"),
                                                                        str(folder / "cat.jpg")]
    with pytest.warns(SkippedImageWarning, match=r"1 subfolder of .* \(a\):"):  # predictions/ is not named
        assert len(run(tiny_checkpoint, folder, out, overwrite=True)) == 1


def test_picture_names_stay_unique_when_a_subfolder_path_meets_a_file_name(tmp_path):
    paths = [tmp_path / "a" / "cat.jpg", tmp_path / "a_cat.jpg", tmp_path / "b" / "cat.png"]
    assert output_names(paths, relative_to=[tmp_path]) == ["a_cat_jpg.png", "a_cat_jpg_2.png", "b_cat.png"]
    assert output_names(paths) == ["cat_jpg.png", "a_cat.png", "cat_png.png"]  # files given one by one


def test_list_images_recursive_sorts_by_path_in_the_folder(tmp_path):
    folder = photos(tmp_path, "z.jpg", "a.jpg", "sub/b.jpg", "sub/deeper/c.jpg", "a0/d.jpg")
    relative = [p.relative_to(folder).as_posix() for p in list_images(folder, recursive=True)]
    assert relative == ["a.jpg", "a0/d.jpg", "sub/b.jpg", "sub/deeper/c.jpg", "z.jpg"]
    assert [p.name for p in list_images(folder)] == ["a.jpg", "z.jpg"]
    assert expand_inputs([folder, folder / "sub"], recursive=True)[2:4] == [folder / "sub/b.jpg",
                                                                          folder / "sub/deeper/c.jpg"]


class Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.mark.parametrize("count, drawn", [(3, True), (1, False)])
def test_predict_draws_a_progress_bar_on_a_terminal_for_several_images(tiny_checkpoint, tmp_path, monkeypatch,
                                                                       count, drawn):
    folder = photos(tmp_path / "photos", *[f"{i}.jpg" for i in range(count)])
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    run(tiny_checkpoint, folder, tmp_path / "out")
    assert ("predict" in terminal.getvalue() and f"/{count}" in terminal.getvalue()) == drawn


LAZY = textwrap.dedent('''
    import json, sys
    LIBRARIES = ("onnxruntime", "onnx", "onnxscript")
    if sys.argv[1] == "missing":
        for name in LIBRARIES:
            sys.modules[name] = None  # as if not installed: importing it raises ImportError
    import detr_irpe.apps.predict, detr_irpe.export
    from detr_irpe.export import OnnxDetector, export_checkpoint
    from detr_irpe.export.exporter import check_options
    from detr_irpe.optional import MissingExtraError
    report = {"loaded": sorted(m for m in sys.modules if m.split(".")[0] in LIBRARIES and sys.modules[m])}
    if sys.argv[1] == "missing":
        for name, call in [("OnnxDetector", lambda: OnnxDetector("model.onnx")),
                           ("export_checkpoint", lambda: export_checkpoint("missing.pth", "model.onnx"))]:
            try:
                call()
                report[name] = "no error"
            except MissingExtraError as e:
                report[name] = str(e)
        report["torch-export"] = check_options("model.pt2", "torch-export", None)
    print(json.dumps(report))
''')


@pytest.mark.parametrize("libraries", ["installed", "missing"])
def test_importing_predict_and_export_loads_no_onnx_library(libraries, tmp_path):
    proc = run_python(LAZY, libraries, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.splitlines()[-1])
    assert report["loaded"] == []
    if libraries == "missing":
        for name in ("OnnxDetector", "export_checkpoint"):
            assert 'pip install "detr_irpe[export]"' in report[name], report[name]
        assert "predict --onnx" in report["OnnxDetector"] and "export to ONNX" in report["export_checkpoint"]
        assert report["torch-export"] is None  # a torch.export program needs none of them
