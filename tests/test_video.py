"""predict on video: a clip of moving shapes made here (PyAV), predicted frame by frame and compared
with predict on the same decoded frames as images; --every, --max-frames, a stream URL, Ctrl-C,
bad inputs."""
import functools
from fractions import Fraction
import http.server
import json
import os
import signal
import threading
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image

from detr_irpe.apps.cli import main
from detr_irpe.data.video import read_video_frames
from detr_irpe.engine.inference import LoadedDetector
from detr_irpe.visualize import save_png

WIDTH, HEIGHT, FRAMES, RATE = 160, 120, 12, 8


def make_clip(path, frames=FRAMES, width=WIDTH, height=HEIGHT, rate=RATE):
    """A square moving right and a disc moving left on a grey background, H.264."""
    ys, xs = np.mgrid[:height, :width]
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=rate)
        stream.width, stream.height = width, height
        stream.pix_fmt = "yuv420p" if width % 2 == 0 and height % 2 == 0 else "yuv444p"
        for i in range(frames):
            image = np.full((height, width, 3), 90, np.uint8)
            image[20:60, 5 + 6 * i:45 + 6 * i] = (230, 40, 40)
            image[(ys - 85) ** 2 + (xs - 130 + 5 * i) ** 2 < 18 ** 2] = (40, 200, 70)
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return Path(path)


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return make_clip(tmp_path_factory.mktemp("clip") / "shapes.mp4")


def read_lines(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def video_info(path):
    """(frames decoded, width, height, average rate) of a video file."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        count = sum(1 for _ in container.decode(stream))
        return count, stream.codec_context.width, stream.codec_context.height, stream.average_rate


def predict(*args):
    return main(["predict", *map(str, args)])


def test_each_frame_gets_the_detections_of_predict_on_that_frame_as_an_image(clip, tiny_checkpoint, tmp_path):
    assert predict("--checkpoint", tiny_checkpoint, clip, "--out", tmp_path / "video", "--threshold", 0.0,
                   "--batch-size", 3) == 0
    frames = read_video_frames(clip)
    assert [f.index for f in frames] == list(range(FRAMES))
    for frame in frames:  # PNG is lossless: the images path reads back the same tensors
        save_png(frame.image, tmp_path / "frames" / f"frame{frame.index:03d}.png")
    assert predict("--checkpoint", tiny_checkpoint, tmp_path / "frames", "--out", tmp_path / "images",
                   "--threshold", 0.0) == 0

    images = json.loads((tmp_path / "images" / "detections.json").read_text())
    lines = read_lines(tmp_path / "video" / "shapes.jsonl")
    assert [line["index"] for line in lines] == list(range(FRAMES))
    assert [line["timestamp"] for line in lines] == pytest.approx([i / RATE for i in range(FRAMES)])
    for line, image in zip(lines, images):
        assert len(line["detections"]) == len(image["detections"]) == 5  # every query at threshold 0
        for got, want in zip(line["detections"], image["detections"]):
            x1, y1, x2, y2 = want["box"]
            assert got["bbox"] == pytest.approx([x1, y1, x2 - x1, y2 - y1], abs=1e-3)
            assert got["score"] == pytest.approx(want["score"], abs=1e-5)
            assert (got["category_id"], got["name"]) == (want["label"], want["name"])

    count, width, height, rate = video_info(tmp_path / "video" / "shapes.mp4")
    assert (count, width, height, rate) == (FRAMES, WIDTH, HEIGHT, RATE)
    # the video shows the pictures predict draws, up to H.264's loss
    shown = read_video_frames(tmp_path / "video" / "shapes.mp4")[4].image.float()
    with Image.open(tmp_path / "images" / "frame004.png") as picture:
        drawn = torch.from_numpy(np.array(picture)).permute(2, 0, 1).float()
    plain = frames[4].image.float()
    ink = (drawn != plain).any(0)  # the pixels of the boxes and labels
    assert ink.sum() > 500
    # brightness: H.264 keeps it at full resolution (colour at half), which thin lines need
    to_drawn, to_plain = ((shown.mean(0) - x.mean(0)).abs()[ink].mean() for x in (drawn, plain))
    assert to_drawn < to_plain / 2
    assert not list((tmp_path / "video").glob(".*"))  # no temporary file left


def test_frames_are_ffmpegs_rgb_of_each_frame_at_any_size(clip, tiny_checkpoint, tmp_path):
    odd = make_clip(tmp_path / "odd.mp4", frames=3, width=161, height=121)  # 4:2:0 cannot hold odd sides
    for video in (clip, odd):
        with av.open(str(video)) as container:
            reference = [torch.from_numpy(f.to_ndarray(format="rgb24")).permute(2, 0, 1) for f in container.decode(video=0)]
        frames = read_video_frames(video)
        assert len(frames) == len(reference) and all(torch.equal(f.image, r) for f, r in zip(frames, reference))
    assert predict("--checkpoint", tiny_checkpoint, odd, "--out", tmp_path / "out") == 0
    assert video_info(tmp_path / "out" / "odd.mp4")[:3] == (3, 161, 121)


def test_every_and_max_frames_choose_the_frames_predicted(clip, tiny_checkpoint, tmp_path):
    assert predict("--checkpoint", tiny_checkpoint, clip, "--out", tmp_path, "--every", 3, "--max-frames", 3) == 0
    assert [line["index"] for line in read_lines(tmp_path / "shapes.jsonl")] == [0, 3, 6]
    count, width, height, rate = video_info(tmp_path / "shapes.mp4")
    assert (count, width, height, rate) == (3, WIDTH, HEIGHT, Fraction(RATE, 3))
    assert predict("--checkpoint", tiny_checkpoint, clip, "--out", tmp_path, "--every", 5, "--overwrite") == 0
    assert [line["index"] for line in read_lines(tmp_path / "shapes.jsonl")] == [0, 5, 10]


def test_a_stream_url_gives_the_files_detections(clip, tiny_checkpoint, tmp_path):
    """An http stream served on this machine: no frame count, no seeking, the same frames."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(clip.parent))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/{clip.name}"
        assert predict("--checkpoint", tiny_checkpoint, url, "--out", tmp_path / "stream", "--max-frames", 4) == 0
    finally:
        server.shutdown()
    assert predict("--checkpoint", tiny_checkpoint, clip, "--out", tmp_path / "file", "--max-frames", 4) == 0
    assert read_lines(tmp_path / "stream" / "shapes.jsonl") == read_lines(tmp_path / "file" / "shapes.jsonl")


def test_ctrl_c_keeps_what_was_written_playable_and_exits_130(clip, tiny_checkpoint, tmp_path, monkeypatch, capsys):
    calls = []
    detect = LoadedDetector.detect

    def interrupted_on_the_third_batch(self, images, batch_size=None):
        calls.append(len(images))
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)  # as Ctrl-C: delivered to the main thread, in here
        return detect(self, images, batch_size)

    monkeypatch.setattr(LoadedDetector, "detect", interrupted_on_the_third_batch)
    handler = signal.getsignal(signal.SIGINT)
    assert predict("--checkpoint", tiny_checkpoint, clip, "--out", tmp_path, "--batch-size", 2) == 130
    assert signal.getsignal(signal.SIGINT) is handler  # restored
    assert "stopped" in capsys.readouterr().out
    lines = read_lines(tmp_path / "shapes.jsonl")
    count, width, height, _ = video_info(tmp_path / "shapes.mp4")
    assert 2 <= len(lines) == count < FRAMES and (width, height) == (WIDTH, HEIGHT)
    assert not list(tmp_path.glob(".*"))


def test_a_segmentation_model_writes_each_detections_mask_as_rle(clip, tmp_path):
    from pycocotools import mask as coco_mask

    from helpers import save_tiny_checkpoint
    from detr_irpe.apps.detector import Detector

    checkpoint = save_tiny_checkpoint(tmp_path / "seg.pth", model_options={"masks": True})
    assert predict("--checkpoint", checkpoint, clip, "--out", tmp_path / "out", "--max-frames", 2,
                   "--threshold", 0.0) == 0
    lines = read_lines(tmp_path / "out" / "shapes.jsonl")
    want = Detector.from_checkpoint(checkpoint, device="cpu").predict(read_video_frames(clip, 1)[0].image,
                                                                      threshold=0.0)[0]
    got = lines[0]["detections"]
    assert len(got) == len(want) == 5
    for detection, record in zip(got, want):
        decoded = coco_mask.decode({**detection["segmentation"], "counts": detection["segmentation"]["counts"].encode()})
        assert decoded.shape == (HEIGHT, WIDTH) and np.array_equal(decoded.astype(bool), record["mask"].numpy())


@pytest.mark.parametrize("damage", ["cut before its index", "not a video"])
def test_a_truncated_or_non_video_file_is_one_error_line(clip, tiny_checkpoint, tmp_path, capsys, damage):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(clip.read_bytes()[:len(clip.read_bytes()) // 2] if damage != "not a video" else b"hello\n" * 50)
    assert predict("--checkpoint", tiny_checkpoint, bad, "--out", tmp_path / "out") == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: cannot open {bad} as a video"), err
    assert not list((tmp_path / "out").iterdir())


def test_a_video_cut_after_its_index_keeps_the_frames_before_and_is_one_error_line(tiny_checkpoint, tmp_path,
                                                                                  capsys):
    """An MP4 with its index first (faststart), cut in the middle: FFmpeg decodes what is there and
    stops without an error; the frame count its index declares tells."""
    whole = tmp_path / "whole.mp4"
    with av.open(str(whole), "w", options={"movflags": "faststart"}) as container:
        stream = container.add_stream("libx264", rate=RATE)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        noise = np.random.default_rng(0).integers(0, 256, (FRAMES, HEIGHT, WIDTH, 3), dtype=np.uint8)
        for image in noise:  # noise: every frame the same size, so half the bytes hold about half the frames
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    cut = tmp_path / "cut" / "cut.mp4"
    cut.parent.mkdir()
    cut.write_bytes(whole.read_bytes()[:whole.stat().st_size // 2])
    assert predict("--checkpoint", tiny_checkpoint, cut, "--out", tmp_path / "out") == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"of the {FRAMES} frames its header declares: the file is truncated" in err[0], err
    kept = read_lines(tmp_path / "out" / "cut.jsonl")
    assert 0 < len(kept) < FRAMES and video_info(tmp_path / "out" / "cut.mp4")[0] == len(kept)
    assert f"{len(kept)} frames before it are in" in err[0]


def test_a_missing_webcam_and_mixed_inputs_are_one_error_line(clip, tiny_checkpoint, tmp_path, capsys):
    assert predict("--checkpoint", tiny_checkpoint, "7", "--out", tmp_path) == 1
    assert capsys.readouterr().err.startswith("error: no webcam at /dev/video7")
    image = tmp_path / "a.png"
    save_png(torch.zeros(3, 8, 8, dtype=torch.uint8), image)
    assert predict("--checkpoint", tiny_checkpoint, clip, image, "--out", tmp_path / "out") == 1
    assert "images and videos in one run" in capsys.readouterr().err


def test_an_earlier_run_is_not_replaced_without_overwrite(clip, tiny_checkpoint, tmp_path, capsys):
    (tmp_path / "shapes.jsonl").write_text("mine\n")
    assert predict("--checkpoint", tiny_checkpoint, clip, "--out", tmp_path) == 1
    assert "--overwrite" in capsys.readouterr().err and (tmp_path / "shapes.jsonl").read_text() == "mine\n"


@pytest.mark.slow  # the export alone takes 15-25 s here
def test_onnx_runtime_gives_the_video_the_checkpoints_detections(clip, tiny_checkpoint, tmp_path):
    assert main(["export", "--checkpoint", str(tiny_checkpoint), "--out", str(tmp_path / "tiny.onnx")]) == 0
    assert predict("--onnx", tmp_path / "tiny.onnx", clip, "--out", tmp_path / "onnx", "--threshold", 0.0,
                   "--batch-size", 4) == 0
    assert predict("--checkpoint", tiny_checkpoint, clip, "--out", tmp_path / "eager", "--threshold", 0.0) == 0
    onnx, eager = (read_lines(tmp_path / name / "shapes.jsonl") for name in ("onnx", "eager"))
    assert [line["index"] for line in onnx] == list(range(FRAMES))
    for got, want in zip(onnx, eager):
        assert [d["category_id"] for d in got["detections"]] == [d["category_id"] for d in want["detections"]]
        for a, b in zip(got["detections"], want["detections"]):
            assert a["score"] == pytest.approx(b["score"], abs=1e-4)
            assert a["bbox"] == pytest.approx(b["bbox"], abs=1e-2)
    assert video_info(tmp_path / "onnx" / "shapes.mp4")[0] == FRAMES
