"""Bad input: every problem gets an error naming the file, the id and the value, and what to do,
before any training time is spent; what the loader tolerates never produces NaN targets."""
import contextlib
import json
import os
import runpy
import signal
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import get_worker_info

from detr_irpe.config import Config
from detr_irpe.data import AnnotationError, CocoDetection, DatasetNotFoundError, ImageDecodeError, build_dataloader
from detr_irpe.data.check import check_dataset
from detr_irpe.data.errors import DataItemError, DataLoaderWorkerError
from detr_irpe.data import validate
from detr_irpe.apps.predict import SkippedImageWarning, predict_images
from detr_irpe.data.images import read_rgb
from detr_irpe.engine.inference import load_detector
from detr_irpe.models import build_detr
from helpers import TINY, run_python

REPO = Path(__file__).resolve().parents[1]
COCO = REPO / "tests" / "data" / "coco"
REAL_JPEG = COCO / "train2017" / "000000425989.jpg"  # 213 x 140


# --- helpers -------------------------------------------------------------------------------------

def image_entry(image_id, w=40, h=30, **extra):
    return {"id": image_id, "file_name": f"{image_id}.png", "width": w, "height": h, **extra}


def ann(ann_id, image_id=1, category_id=1, bbox=(2, 3, 10, 8), **extra):
    return {"id": ann_id, "image_id": image_id, "category_id": category_id, "bbox": list(bbox), "iscrowd": 0,
            **extra}


def write_dataset(root: Path, images, annotations, categories=({"id": 1, "name": "thing"},), write_images=True):
    """An annotation json and a folder with a grey PNG of the right size for every image entry."""
    folder = root / "images"
    folder.mkdir(parents=True, exist_ok=True)
    if write_images:
        for img in images:
            w, h = (img.get("width"), img.get("height")) if isinstance(img, dict) else (None, None)
            if isinstance(img.get("file_name"), str) and isinstance(w, int) and w > 0 and isinstance(h, int) and h > 0:
                Image.fromarray(np.full((h, w, 3), 128, np.uint8)).save(folder / img["file_name"])
    path = root / "ann.json"
    path.write_text(json.dumps({"images": list(images), "annotations": list(annotations),
                                "categories": list(categories)}))
    return folder, path


def construction_error(tmp_path, images, annotations, **kw) -> str:
    folder, path = write_dataset(tmp_path, images, annotations, **kw)
    with pytest.raises(AnnotationError) as info:
        CocoDetection(folder, path)
    message = str(info.value)
    assert str(path) in message  # names the file
    assert "tools/check_data.py" in message  # and how to see everything
    return message


# --- annotation validation: fatal at construction ---------------------------------------------------

def test_nan_boxes_name_ids_and_values(tmp_path):
    anns = [ann(12, bbox=(float("nan"), 1, 2, 3)), ann(13), ann(40, bbox=(1, 1, float("nan"), 3)),
            ann(77, bbox=(1, float("nan"), 2, 3))]
    message = construction_error(tmp_path, [image_entry(1)], anns)
    assert "3 annotations with NaN or infinite bbox values" in message
    assert "annotation 12 (image 1) has bbox [nan, 1, 2, 3]" in message
    assert "annotation 40" in message and "annotation 77" in message and "annotation 13" not in message
    assert "Fix or remove" in message


def test_infinite_and_overflowing_boxes(tmp_path):
    anns = [ann(5, bbox=(1, 1, float("inf"), 3)), ann(6, bbox=(10**400, 1, 2, 3))]  # 10**400: no float holds it
    message = construction_error(tmp_path, [image_entry(1)], anns)
    assert "2 annotations with NaN or infinite bbox values" in message
    assert "annotation 5 (image 1) has bbox [1, 1, inf, 3]" in message and "annotation 6" in message


@pytest.mark.parametrize("bbox", [[1, 2, 3], [1, 2, 3, 4, 5], ["1", 2, 3, 4], None, {"x": 1}, [True, 1, 2, 3],
                                  "1,2,3,4"])
def test_malformed_box(tmp_path, bbox):
    message = construction_error(tmp_path, [image_entry(1)], [dict(ann(9), bbox=bbox)])
    assert "1 annotation whose 'bbox' is not a list of 4 numbers" in message
    assert f"annotation 9 (image 1) has bbox {bbox!r}" in message and "[x, y, width, height]" in message


def test_unknown_category(tmp_path):
    message = construction_error(tmp_path, [image_entry(1)], [ann(3, category_id=7), ann(4, category_id="1")])
    assert "2 annotations whose category_id is not in 'categories'" in message
    assert "annotation 3 (image 1) has category_id 7" in message
    assert "annotation 4 (image 1) has category_id '1'" in message  # a string, not the id 1
    assert "'categories' has ids [1]: add the category" in message


def test_unknown_image_id(tmp_path):
    message = construction_error(tmp_path, [image_entry(1)], [ann(3, image_id=99)])
    assert "annotation 3 (image 99) refers to image_id 99" in message and "Add the image entry" in message


def test_duplicate_ids(tmp_path):
    images = [image_entry(1), dict(image_entry(1), file_name="other.png"), image_entry(2)]
    message = construction_error(tmp_path, images, [ann(8), ann(8, image_id=2)])
    assert "1 image id used by more than one entry of 'images': id 1 (entries #0 and #1)" in message
    assert "1 annotation id used by more than one annotation: id 8 (entries #0 and #1)" in message


def test_annotation_id_zero_is_refused(tmp_path):
    # pycocotools' COCOeval reads a match with ground-truth id 0 as no match: a silently wrong AP
    message = construction_error(tmp_path, [image_entry(1)], [ann(0), ann(2)])
    assert "1 annotation without a valid 'id' (an integer >= 1): entry #0 has id 0" in message
    assert "COCOeval" in message


def test_bad_image_entries(tmp_path):
    images = [image_entry(1, w=-40), image_entry(2, w="40"), {"id": "3", "file_name": "3.png"},
              {"id": 4, "width": 40, "height": 30}]
    message = construction_error(tmp_path, images, [])
    assert "image 1 has width -40, height 30" in message and "image 2 has width '40'" in message
    assert "entry #2 has id '3'" in message and "image 4 has file_name None" in message


def test_empty_dataset(tmp_path):
    message = construction_error(tmp_path, [], [])
    assert "the file lists no images: the dataset is empty" in message


def test_every_error_is_listed_at_once(tmp_path):
    anns = [ann(1, bbox=(float("nan"), 0, 1, 1)), ann(2, category_id=5), ann(3, image_id=7), ann(4, bbox=[1])]
    message = construction_error(tmp_path, [image_entry(1)], anns)
    assert "4 kind(s) of problem" in message
    for needle in ("NaN", "category_id 5", "image_id 7", "has bbox [1]"):
        assert needle in message


def valid_coco(n: int) -> dict:
    """A valid COCO dict of ``n`` annotations (a multiple of 7) on ``n / 7`` images, 80 categories."""
    rng = np.random.default_rng(0)
    images = [{"id": i, "file_name": f"{i}.jpg", "width": 640, "height": 480} for i in range(n // 7)]
    xy = rng.uniform(0, 400, (n, 2)).round(2).tolist()
    anns = [{"id": i + 1, "image_id": i % len(images), "category_id": 1 + i % 80, "bbox": [x, y, 30.5, 20.0],
             "area": 610.0, "iscrowd": 0} for i, (x, y) in enumerate(xy)]
    return {"images": images, "annotations": anns, "categories": [{"id": c} for c in range(1, 81)]}


def lines_run(module, function, *args):
    """``function(*args)`` and how many lines of ``module``'s code it ran (``sys.settrace`` line events)."""
    count = [0]

    def line(frame, event, arg):
        count[0] += event == "line"
        return line

    previous = sys.gettrace()
    sys.settrace(lambda frame, event, arg: line if frame.f_code.co_filename == module.__file__ else None)
    try:
        result = function(*args)
    finally:
        sys.settrace(previous)
    return result, count[0]


def test_validation_work_grows_linearly_with_the_annotations():
    """COCO train2017 has 860k annotations: validating them must stay linear (no scan of the images
    or the annotations per annotation). Counted in lines run, not in seconds: twice the annotations
    and images run at most twice the lines of the validator (a quadratic slip runs four times)."""
    report, small = lines_run(validate, validate.validate_coco_dict, valid_coco(7_000))
    assert report.ok and report.num_annotations == 7_000 and small > 7_000
    report, large = lines_run(validate, validate.validate_coco_dict, valid_coco(14_000))
    assert report.ok and report.num_annotations == 14_000
    assert large <= 2 * small, f"{small} lines for 7,000 annotations but {large} for 14,000"


# --- tolerated: handled during loading, never NaN ----------------------------------------------------

def test_degenerate_boxes_are_dropped_or_clipped_never_nan(tmp_path):
    anns = [ann(1, bbox=(10, 10, 0, 5)),  # zero width: dropped
            ann(2, bbox=(10, 10, -4, 5)),  # negative width: dropped
            ann(3, bbox=(45, 5, 10, 10)),  # outside the 40 x 30 image: dropped
            ann(4, bbox=(-5, 10, 20, 30)),  # across the border: clipped to [0, 10, 15, 20]
            ann(5, bbox=(-1e300, -1e300, 1e300, 1e300)),  # huge but finite: clipped to nothing, no overflow
            ann(6, bbox=(-1e300, 0, 2e300, 1e300)),  # huge, covers the image: clipped to the image
            ann(7, bbox=(1, 2, 3, 4))]
    folder, path = write_dataset(tmp_path, [image_entry(1)], anns)
    _, target = CocoDetection(folder, path)[0]
    assert torch.isfinite(target["boxes"]).all() and torch.isfinite(target["area"]).all()
    expected = torch.tensor([[7.5 / 40, 20 / 30, 15 / 40, 20 / 30], [0.5, 0.5, 1.0, 1.0],
                             [2.5 / 40, 4 / 30, 3 / 40, 4 / 30]])
    assert torch.allclose(target["boxes"], expected)
    assert target["labels"].tolist() == [1, 1, 1]

    report = check_dataset(path, folder)
    assert report.ok  # only warnings
    text = {f.code: f.describe() for f in report.warnings}
    assert "annotation 1 (image 1) has bbox [10, 10, 0, 5]" in text["bbox_empty"]
    assert "annotation 2 (image 1) has bbox [10, 10, -4, 5]" in text["bbox_negative"]
    assert "annotation 3 (image 1) has bbox [45, 5, 10, 10] in a 40x30 image" in text["bbox_outside"]
    assert "2 annotations whose box extends" in text["bbox_clipped"]
    assert "annotation 4 (image 1)" in text["bbox_clipped"] and "annotation 6" in text["bbox_clipped"]


def test_images_without_size_are_tolerated(tmp_path):
    folder, path = write_dataset(tmp_path, [image_entry(1)], [ann(1)])
    data = json.loads(path.read_text())
    del data["images"][0]["width"], data["images"][0]["height"]
    del data["annotations"][0]["iscrowd"]  # also filled in, as COCOeval needs it
    path.write_text(json.dumps(data))
    ds = CocoDetection(folder, path)
    image, target = ds[0]
    assert image.shape == (3, 30, 40) and target["boxes"].shape == (1, 4)
    assert ds.coco.getAnnIds(iscrowd=False) == [1] and ds.coco.anns[1]["area"] == 80.0
    warning = check_dataset(path, folder).findings["image_size_missing"]
    assert warning.severity == "warning" and "1 image without 'width' / 'height': image 1" in warning.describe()


# --- tools/check_data.py and tools/train.py --check-data ---------------------------------------------

def run_script(script, *args, capsys):
    """Run tools/<script> in this process; (exit code, stdout)."""
    argv = sys.argv
    sys.argv = [script] + [str(a) for a in args]
    try:
        with pytest.raises(SystemExit) as info:
            runpy.run_path(str(REPO / "tools" / script), run_name="__main__")
    finally:
        sys.argv = argv
    code = info.value.code  # sys.exit("error: ...") carries the message instead of a number
    return (code if isinstance(code, int) else 1), capsys.readouterr().out + (code if isinstance(code, str) else "")


def broken_dataset(root: Path):
    """A dataset with one of each problem the check finds."""
    images = [image_entry(i) for i in range(1, 9)]
    anns = [ann(1), ann(12, bbox=(float("nan"), 1, 2, 3)), ann(40, bbox=(1, 1, float("nan"), 3)),
            ann(77, image_id=2, bbox=(1, float("inf"), 2, 3)), ann(5, category_id=9), ann(6, image_id=99),
            ann(7, bbox=(50, 50, 5, 5))]
    folder, path = write_dataset(root, images, anns)
    (folder / "2.png").unlink()  # missing
    data = REAL_JPEG.read_bytes()
    (folder / "3.png").write_bytes(data[: len(data) // 2])  # truncated (a JPEG under a .png name: PIL sniffs)
    (folder / "4.png").write_text("not an image at all")
    Image.fromarray(np.zeros((30, 50, 3), np.uint8)).save(folder / "5.png")  # 50x30, json says 40x30
    return folder, path


def test_check_tool_reports_every_problem(tmp_path, capsys):
    folder, path = broken_dataset(tmp_path)
    code, out = run_script("check_data.py", "--annotations", path, "--images", folder, capsys=capsys)
    assert code == 1
    assert "8 images, 7 annotations, 1 categories; 8 image files checked (each decoded fully)" in out
    assert "ERROR   3 annotations with NaN or infinite bbox values: annotation 12 (image 1) has bbox [nan, 1, 2, 3]; " \
           "annotation 40 (image 1) has bbox [1, 1, nan, 3]; annotation 77 (image 2) has bbox [1, inf, 2, 3]" in out
    assert "annotation 5 (image 1) has category_id 9" in out and "annotation 6 (image 99) refers to image_id 99" in out
    assert f"ERROR   1 image file missing: {folder / '2.png'} (image 2)" in out
    assert "ERROR   2 image files that cannot be decoded" in out
    assert f"{folder / '3.png'} (image 3): image file is truncated" in out and f"{folder / '4.png'} (image 4)" in out
    assert f"ERROR   1 image file whose size differs from the json's width / height: {folder / '5.png'} (image 5) " \
           f"is 50x30, the json says 40x30" in out
    assert "WARNING 1 annotation whose box lies entirely outside its image" in out
    assert out.strip().splitlines()[-1].startswith("check_data FAILED (dataset): 6 kinds (9 items) of errors, 1 kind")

    code, out = run_script("check_data.py", "--annotations", path, "--images", folder, "--no-images", capsys=capsys)
    assert code == 1 and "image file missing" in out and "cannot be decoded" not in out and "50x30" not in out


def test_check_tool_on_clean_data_and_json_errors(tmp_path, capsys):
    code, out = run_script("check_data.py", f"data.root={COCO}", capsys=capsys)
    assert code == 0 and out.count("no problems found") == 2
    assert "check_data OK (train, val): no errors, no warnings" in out
    (tmp_path / "bad.json").write_text('{"images": [}')
    code, out = run_script("check_data.py", "--annotations", tmp_path / "bad.json", "--no-images", capsys=capsys)
    assert code == 1 and f"{tmp_path / 'bad.json'} is not valid JSON" in out
    code, out = run_script("check_data.py", "--annotations", tmp_path / "nope.json", capsys=capsys)
    assert code == 1 and f"annotation file not found: {tmp_path / 'nope.json'}" in out


def test_train_check_data_stops_before_training(tmp_path, capsys):
    folder, path = broken_dataset(tmp_path)
    out_dir = tmp_path / "run"
    code, out = run_script("train.py", "--check-data", f"data.root={tmp_path}", "data.train_images=images",
                           f"data.train_annotations={path}", f"data.val_images={COCO / 'val2017'}",
                           f"data.val_annotations={COCO / 'annotations' / 'instances_val2017.json'}",
                           f"train.output_dir={out_dir}", capsys=capsys)
    assert code == 1 and "== train:" in out and "== val:" in out and "annotation 12 (image 1)" in out
    assert "check_data FAILED (train, val)" in out
    assert not out_dir.exists()  # no training started


# --- data loading: the failing item is named ---------------------------------------------------------

class FailOn:
    """A transform that raises on the image of a given size (one item of the dataset)."""

    def __init__(self, width):
        self.width = width

    def __call__(self, image, target):
        if image.shape[-1] == self.width:
            raise ZeroDivisionError("float division by zero")
        return image, target


class KillWorkerOn(CocoDetection):
    """Item ``victim`` kills the DataLoader worker loading it (as the OOM killer or a segfault would);
    given ``after`` (a path), once that file exists, and it leaves its pid in ``after``.pid first."""

    victim, after = 5, None

    def __getitem__(self, index):
        if index == self.victim and get_worker_info() is not None:
            if self.after is not None:
                while not self.after.exists():  # an event, not a time: however slow the machine
                    time.sleep(0.01)
                self.after.with_suffix(".tmp").write_text(str(os.getpid()))
                os.replace(self.after.with_suffix(".tmp"), self.after.with_suffix(".pid"))
            os.kill(os.getpid(), signal.SIGKILL)
        return super().__getitem__(index)


def exited(pid: int) -> bool:
    """Whether child ``pid`` has exited (it stays a zombie for PyTorch to inspect: WNOWAIT)."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:  # already reaped
        return True


@contextlib.contextmanager
def shut_down_workers(loader):
    """Stop the loader's workers on leaving, not at garbage collection (where PyTorch waits 5 s per
    worker after a failure, slowing whichever test runs then)."""
    try:
        yield
    finally:
        if getattr(loader, "_iterator", None) is not None:
            previous = signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # PyTorch's handler re-raises a dead worker
            try:
                loader._iterator._shutdown_workers()
            finally:
                signal.signal(signal.SIGCHLD, previous)


def val_set(cls=CocoDetection, transforms=None):
    return cls(COCO / "val2017", COCO / "annotations" / "instances_val2017.json", transforms)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_exception_in_an_item_names_it(num_workers):
    ds = val_set(transforms=FailOn(width=320))  # image 404484 is the 320 x 240 one
    index = ds.ids.index(404484)
    path = COCO / "val2017" / "000000404484.jpg"
    loader = build_dataloader(ds, batch_size=1, train=False, num_workers=num_workers)
    with pytest.raises(DataItemError) as info, shut_down_workers(loader):
        for _ in loader:
            pass
    message = str(info.value)
    assert f"loading item {index} (image id 404484, file {path})" in message
    assert "ZeroDivisionError: float division by zero" in message and "tools/check_data.py" in message


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # torch's cleanup after a kill
@pytest.mark.parametrize("busy_main", [False, True], ids=["waiting-for-batch", "in-training-step"])
def test_killed_worker_names_its_item(busy_main, tmp_path):
    ds = val_set(KillWorkerOn)
    step = tmp_path / "step"
    if busy_main:
        # item 3 is the second one worker 1 is given: it dies once the main process is busy with
        # batch 0 (the step), so PyTorch's SIGCHLD handler notices it there. Ordered by events
        # (the step has begun, the worker has exited), never by seconds.
        ds.victim, ds.after = 3, step
    image_id = ds.ids[ds.victim]
    loader = build_dataloader(ds, batch_size=1, train=False, num_workers=2)
    with pytest.raises(DataLoaderWorkerError) as info, shut_down_workers(loader):
        for _ in loader:
            if busy_main:
                step.touch()
                while not step.with_suffix(".pid").exists():
                    time.sleep(0.01)
                victim = int(step.with_suffix(".pid").read_text())
                while not exited(victim):
                    time.sleep(0.01)
                for _ in range(100):  # its SIGCHLD is already pending: the handler raises at once
                    time.sleep(0.01)
    if busy_main:  # raised inside the loop body, not by next(loader)
        assert any(entry.name == "handler" for entry in info.traceback)
    message = str(info.value)
    assert "worker 1 (pid " in message
    assert f"while loading item {ds.victim} (image id {image_id}, " \
           f"file {COCO / 'val2017' / f'{image_id:012d}.jpg'})" in message
    assert "killed by" in message and "out of memory" in message and "data.num_workers=0" in message


# --- images at predict time -------------------------------------------------------------------------

EVAL_SIZE, MAX_SIZE = 64, 96


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model, _, _ = build_detr(**TINY)
    cfg = Config()
    for key, value in TINY.items():
        setattr(cfg.model, key, value)
    cfg.data.eval_size, cfg.data.max_size = EVAL_SIZE, MAX_SIZE
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pth"
    torch.save({"model": model.state_dict(), "config": cfg.to_dict(), "categories": {1: "a", 2: "b", 3: "c"}}, path)
    return path


def odd_images(folder: Path) -> dict:
    rng = np.random.default_rng(0)
    folder.mkdir(exist_ok=True)
    arrays = {
        "gray.png": (rng.integers(0, 256, (30, 40), dtype=np.uint8), "L"),
        "rgba.png": (np.dstack([np.full((30, 40, 3), 10, np.uint8), np.zeros((30, 40), np.uint8)]), "RGBA"),
        "palette.gif": (rng.integers(0, 256, (30, 40, 3), dtype=np.uint8), "P"),
        "sixteen.png": (np.linspace(0, 65535, 30 * 40).astype(np.uint16).reshape(30, 40), "I;16"),
        "tiny.png": (rng.integers(0, 256, (3, 5, 3), dtype=np.uint8), "RGB"),  # 5 x 3 px, below the stride
        "sliver.png": (np.zeros((1, 500, 3), np.uint8), "RGB"),  # 1 px tall: the eval resize alone gives 0
    }
    for name, (array, mode) in arrays.items():
        image = Image.fromarray(array)
        image = image.convert("P") if mode == "P" else image
        image.save(folder / name)
    data = REAL_JPEG.read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (folder / "notes.jpg").write_text("a text file with an image extension")
    return arrays


def test_read_rgb_converts_every_mode(tmp_path):
    odd_images(tmp_path)
    for name in ("gray.png", "rgba.png", "palette.gif", "sixteen.png", "tiny.png"):
        with Image.open(tmp_path / name) as im:
            size = im.size
        image = read_rgb(tmp_path / name)
        assert image.dtype == torch.uint8 and image.shape == (3, size[1], size[0]), name
    assert read_rgb(tmp_path / "rgba.png").eq(255).all()  # fully transparent: composited on white
    sixteen = read_rgb(tmp_path / "sixteen.png")
    assert sixteen.min() == 0 and sixteen.max() == 255  # 16-bit range mapped onto 8 bits, not clipped
    gray = read_rgb(tmp_path / "gray.png")
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])
    with pytest.raises(ImageDecodeError, match=r"truncated\.jpg: image file is truncated .* replace or remove it"):
        read_rgb(tmp_path / "truncated.jpg")
    with pytest.raises(ImageDecodeError, match=r"notes\.jpg: not an image format PIL knows"):
        read_rgb(tmp_path / "notes.jpg")
    with pytest.raises(DatasetNotFoundError, match="image file not found"):
        read_rgb(tmp_path / "missing.png")


def test_predict_skips_unreadable_images_and_goes_on(tmp_path, checkpoint):
    odd_images(tmp_path / "in")
    detector = load_detector(str(checkpoint))
    seen = []
    detector.model.register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape[-2:])))
    paths = sorted((tmp_path / "in").iterdir())
    with pytest.warns(SkippedImageWarning) as caught:
        results = predict_images(detector, paths, tmp_path / "out", threshold=0.0)
    warned = " ".join(str(w.message) for w in caught)
    assert "truncated.jpg" in warned and "notes.jpg" in warned
    by_name = {Path(r["file"]).name: r for r in results}
    assert len(results) == len(paths) == 8
    assert "image file is truncated" in by_name["truncated.jpg"]["error"]
    assert "not an image format" in by_name["notes.jpg"]["error"]
    good = [name for name, r in by_name.items() if "error" not in r]
    assert len(good) == 6 and all(len(by_name[n]["detections"]) == 5 for n in good)
    assert (tmp_path / "out" / "tiny.png").is_file() and (tmp_path / "out" / "sliver.png").is_file()
    assert len(seen) == 6 and all(max(s) <= MAX_SIZE and min(s) >= 1 for s in seen)
    saved = json.loads((tmp_path / "out" / "detections.json").read_text())
    assert [r.get("error") for r in saved] == [r.get("error") for r in results]

    with pytest.warns(SkippedImageWarning), pytest.raises(ImageDecodeError, match="none of the 2 image"):
        predict_images(detector, [tmp_path / "in" / "truncated.jpg", tmp_path / "in" / "notes.jpg"], tmp_path / "o2")


HUGE_SCRIPT = """
import resource, sys, torch
from detr_irpe.engine.inference import load_detector
from detr_irpe.apps.predict import predict_images
detector = load_detector(sys.argv[1])
seen = []
detector.model.register_forward_pre_hook(lambda m, a: seen.append(tuple(a[0].shape[-2:])))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
predict_images(detector, [sys.argv[2]], sys.argv[3], threshold=0.5)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024, *seen[0])
"""


def test_huge_image_is_resized_not_out_of_memory(tmp_path, checkpoint):
    ramp = np.linspace(0, 255, 6000, dtype=np.float32).astype(np.uint8)
    Image.fromarray(np.broadcast_to(ramp[None, :, None], (4000, 6000, 3)).copy()).save(tmp_path / "huge.jpg")
    proc = run_python(HUGE_SCRIPT, checkpoint, tmp_path / "huge.jpg", tmp_path / "out", timeout=120,
                      env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    growth_mb, h, w = map(int, proc.stdout.split())
    assert (h, w) == (EVAL_SIZE, MAX_SIZE)  # 6000 x 4000 -> 96 x 64: the model never sees the full image
    # the decoded image is 72 MB; its copies (array, tensor, the drawn picture) stay a small multiple of it
    assert growth_mb < 600, f"peak memory grew by {growth_mb} MB for one 6000x4000 image"
