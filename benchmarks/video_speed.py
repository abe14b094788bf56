"""Predict on video against predict on the same frames as images, in one run: frames/s.

    python benchmarks/video_speed.py                          # the demo model and DETR-R50 + iRPE, eager and ORT
    python benchmarks/video_speed.py --models demo --frames 48 --runtimes eager      # a quick run
    python benchmarks/video_speed.py --libraries              # PyAV against torchcodec: decode and encode alone

A clip of moving shapes (``--size``, ``--frames``, 25 frames/s, H.264) is made first; its frames,
decoded once, are also written as PNGs. For each model (random weights: the speed does not depend
on them) and runtime (PyTorch eager, the model exported to ONNX and run by onnxruntime), three ways
run the same frames, round-robin, ``--reps`` times, the median kept:

- **video**: ``predict_video`` (decoding thread, model, drawing + encoding thread) -> MP4 + JSON lines;
- **images**: ``predict_images`` on the PNGs (read, model, draw, write PNG) -> PNGs + detections.json;
- **model only**: the detector on the decoded frames held in memory (no I/O at all): the ceiling.

``video / images`` is the issue's goal (>= 0.9); ``video / model only`` says how much of decoding
and encoding the overlap hides (1.0: all of it). The detections of the two paths are compared.
"""
import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import av
import numpy as np
import torch

from detr_irpe.apps.detector import Detector
from detr_irpe.apps.predict import predict_images
from detr_irpe.apps.video import ENCODER_OPTIONS, AnnotatedVideoWriter, predict_video
from detr_irpe.config import Config, load_config
from detr_irpe.data.video import read_video_frames
from detr_irpe.engine.inference import load_detector
from detr_irpe.export import OnnxDetector
from detr_irpe.models import build_detr
from detr_irpe.visualize import save_png
from machine import describe

RATE = 25


def make_clip(path: Path, frames: int, height: int, width: int) -> Path:
    """Shapes moving over a textured background (so that encoding is not trivially cheap)."""
    ys, xs = np.mgrid[:height, :width]
    background = ((np.sin(xs / 17.0) + np.cos(ys / 11.0)) * 40 + 110).astype(np.uint8)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=RATE)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(frames):
            image = np.repeat(background[..., None], 3, axis=2)
            x = (7 * i) % (width - 120)
            image[height // 5:height // 5 + 100, x:x + 120] = (230, 50, 40)
            image[(ys - height * 2 // 3) ** 2 + (xs - width + 80 + 5 * i % width) ** 2 < 50 ** 2] = (40, 200, 80)
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def model_config(name: str) -> Config:
    if name == "demo":
        cfg = load_config("demo")
        cfg.model.query_groups = 1
    else:
        cfg = Config()
        cfg.model.rpe = "rpe-2.0-product-ctx-1-k"
    cfg.model.backbone_weights = "none"
    return cfg


def detectors(name: str, runtimes, workdir: Path):
    """runtime -> detector, and the ONNX export's seconds."""
    cfg = model_config(name)
    torch.manual_seed(0)
    model = build_detr(cfg.model)[0].eval()
    checkpoint = workdir / f"{name}.pth"
    categories = {i: f"class{i}" for i in range(cfg.model.num_classes)}
    torch.save({"model": model.state_dict(), "config": cfg.to_dict(), "categories": categories}, checkpoint)
    loaded = load_detector(str(checkpoint))
    found, export_s = {}, float("nan")
    if "eager" in runtimes:
        found["eager"] = loaded
    if "onnxruntime" in runtimes:
        start = time.perf_counter()
        Detector(loaded).export_onnx(workdir / f"{name}.onnx")
        export_s = time.perf_counter() - start
        found["onnxruntime"] = OnnxDetector(workdir / f"{name}.onnx")
    return found, export_s


def compare(lines_path: Path, detections_json: Path) -> float:
    """The largest score difference between the video's JSON lines and predict's detections.json."""
    lines = [json.loads(line) for line in lines_path.read_text().splitlines()]
    images = json.loads(detections_json.read_text())
    assert len(lines) == len(images), (len(lines), len(images))
    worst = 0.0
    for line, image in zip(lines, images):
        assert len(line["detections"]) == len(image["detections"])
        for a, b in zip(line["detections"], image["detections"]):
            worst = max(worst, abs(a["score"] - b["score"]))
    return worst


def paths_speed(args, clip: Path, frames, pngs, workdir: Path):
    print("| model | runtime | model input | video frames/s | images frames/s | model only frames/s | "
          "video / images | video / model only | boxes per frame | max score diff |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in args.models:
        found, export_s = detectors(name, args.runtimes, workdir)
        n = args.frames if name == "demo" else args.r50_frames
        for runtime, detector in found.items():
            run = 0

            def video():
                nonlocal run
                run += 1
                return predict_video(detector, clip, workdir / f"v{run}.mp4", workdir / f"v{run}.jsonl",
                                     args.threshold, batch_size=args.batch_size, max_frames=n)

            def images():
                return predict_images(detector, pngs[:n], workdir / f"images_{name}_{runtime}", args.threshold,
                                      batch_size=args.batch_size, overwrite=True)

            def model_only():
                for start in range(0, n, args.batch_size):
                    detector.detect([f.image for f in frames[start:start + args.batch_size]])

            ways = {"video": video, "images": images, "model only": model_only}
            model_only()  # warm-up (allocations, onnxruntime's first run)
            times = {way: [] for way in ways}
            for _ in range(args.reps):
                for way, fn in ways.items():
                    start = time.perf_counter()
                    fn()
                    times[way].append(time.perf_counter() - start)
            fps = {way: n / statistics.median(t) for way, t in times.items()}
            diff = compare(workdir / f"v{run}.jsonl", workdir / f"images_{name}_{runtime}" / "detections.json")
            boxes = sum(1 for line in (workdir / f"v{run}.jsonl").read_text().splitlines()
                        for _ in json.loads(line)["detections"]) / n
            size = model_config(name).data
            note = f" (export {export_s:.0f} s)" if runtime == "onnxruntime" else ""
            print(f"| {name} | {runtime}{note} | eval_size {size.eval_size} | {fps['video']:.2f} | {fps['images']:.2f} | "
                  f"{fps['model only']:.2f} | {fps['video'] / fps['images']:.2f}x | "
                  f"{fps['video'] / fps['model only']:.2f}x | {boxes:.1f} | {diff:.1e} |", flush=True)


def libraries(clip: Path, frames, workdir: Path, reps: int) -> None:
    """Decode to (3, H, W) uint8 tensors, and encode such tensors to H.264, with each library."""
    images = torch.stack([f.image for f in frames])
    n = len(frames)

    def pyav_decode():
        return sum(1 for _ in read_video_frames(clip))

    def pyav_encode():
        writer = AnnotatedVideoWriter(workdir / "pyav.mp4", images.shape[-1], images.shape[-2], RATE)
        for image in images:
            writer.write(image)
        writer.close()

    ways = {"PyAV decode (this project's reader)": pyav_decode, "PyAV encode (this project's writer, frame by frame)": pyav_encode}
    try:
        from torchcodec.decoders import VideoDecoder
        from torchcodec.encoders import VideoEncoder

        VideoDecoder(str(clip))  # loads its FFmpeg libraries: fails without a system FFmpeg

        ways["torchcodec decode"] = lambda: sum(1 for _ in VideoDecoder(str(clip)))
        ways["torchcodec encode (whole clip at once)"] = lambda: VideoEncoder(images, frame_rate=RATE).to_file(
            str(workdir / "torchcodec.mp4"), codec="libx264", pixel_format="yuv420p", preset=ENCODER_OPTIONS["preset"],
            crf=int(ENCODER_OPTIONS["crf"]))
    except Exception as e:  # ImportError, or RuntimeError / OSError when its libraries do not load
        print(f"torchcodec unavailable: {type(e).__name__}: {str(e).strip().splitlines()[0][:200]}")
    times = {way: [] for way in ways}
    for _ in range(reps):
        for way, fn in ways.items():
            start = time.perf_counter()
            fn()
            times[way].append(time.perf_counter() - start)
    print("| way | frames/s |\n|---|---|")
    for way, t in times.items():
        print(f"| {way} | {n / statistics.median(t):.0f} |")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["demo", "r50"], choices=["demo", "r50"])
    parser.add_argument("--runtimes", nargs="+", default=["eager", "onnxruntime"], choices=["eager", "onnxruntime"])
    parser.add_argument("--frames", type=int, default=96, help="clip length, and frames the demo model predicts")
    parser.add_argument("--r50-frames", type=int, default=8, help="frames DETR-R50 predicts (the clip's first)")
    parser.add_argument("--size", type=int, nargs=2, default=[480, 640], metavar=("H", "W"))
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--threshold", type=float, default=0.0, help="boxes drawn: every query at 0 (default)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--libraries", action="store_true", help="only PyAV against torchcodec, decode and encode")
    args = parser.parse_args(argv)
    frames_n = args.frames
    print(f"# video speed: {frames_n} frames of {args.size[0]} x {args.size[1]} at {RATE} frames/s, batch "
          f"{args.batch_size}, PyAV {av.__version__} (FFmpeg {av.ffmpeg_version_info}), {describe()}")
    print(f"# median of {args.reps}, ways timed round-robin\n")
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        clip = make_clip(workdir / "clip.mp4", frames_n, *args.size)
        frames = read_video_frames(clip)
        if args.libraries:
            return libraries(clip, frames, workdir, args.reps)
        pngs = [save_png(f.image, workdir / "frames" / f"frame{f.index:04d}.png") for f in frames]
        paths_speed(args, clip, frames, pngs, workdir)


if __name__ == "__main__":
    main()
