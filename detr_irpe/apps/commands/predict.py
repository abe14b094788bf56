"""detr-irpe predict: draw a checkpoint's (or an ONNX export's) detections on images, or on video
(files, a folder of videos, a webcam index, a stream URL)."""
from __future__ import annotations

from pathlib import Path

from ...data.images import IMAGE_EXTENSIONS
from ...data.video import VIDEO_EXTENSIONS, is_stream_url, is_video_file, is_webcam
from ...errors import UsageError
from ..predict import predict_onnx, predict_path
from . import options


def add_arguments(p) -> None:
    model = p.add_mutually_exclusive_group(required=True)
    model.add_argument("--checkpoint", help="checkpoint: .pth or .safetensors file, Hugging Face folder or hub id, "
                                            "http(s) URL")
    model.add_argument("--onnx", help="a model.onnx written by detr-irpe export (model.onnx.json beside it), "
                                      "run with ONNX Runtime")
    p.add_argument("--config", help="YAML config (a path or a shipped name); default: the checkpoint's")
    options.device(p)
    options.inputs_and_overrides(p, "image files or folders; or videos: video files or folders, a webcam index "
                                    "(0), a stream URL (rtsp://, http://, ...)")
    p.add_argument("--out", required=True, help="output folder for PNGs and detections.json, or per video "
                                                "NAME.mp4 and NAME.jsonl (not the inputs' folder)")
    p.add_argument("--threshold", type=float, default=0.7, help="minimum score to keep a box (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=1, help="images per batch (default %(default)s)")
    p.add_argument("--recursive", action="store_true",
                   help="take the images of subfolders too (a/cat.jpg is drawn to a_cat.png)")
    options.batched_backbone(p)
    options.overwrite(p, "pictures and detections.json (videos and .jsonl files) of an earlier run in --out")
    video = p.add_argument_group("video", "for video inputs (the [video] extra: PyAV); Ctrl-C ends a stream, "
                                          "keeping what was written")
    video.add_argument("--every", type=int, default=1, metavar="N",
                       help="predict every N-th frame (0, N, 2N, ...); the video keeps those frames at 1/N "
                            "of the frame rate (default %(default)s)")
    video.add_argument("--max-frames", type=int, metavar="N", help="stop after predicting N frames of each video")


def _is_video_input(item: str) -> bool:
    """A video file, a webcam, a stream URL, or a folder holding videos and no images."""
    path = Path(item)
    if path.is_dir():
        files = [p.suffix.lower() for p in path.iterdir() if p.is_file()]
        return any(s in VIDEO_EXTENSIONS for s in files) and not any(s in IMAGE_EXTENSIONS for s in files)
    return is_video_file(item) or is_stream_url(item) or (is_webcam(item) and not path.is_file())


def _run_video(args, inputs, overrides) -> int:
    from ..video import predict_video_checkpoint, predict_video_onnx

    if args.recursive:
        raise UsageError("--recursive applies to folders of images; pass the video files or their folder")
    common = dict(batch_size=args.batch_size, every=args.every, max_frames=args.max_frames, overwrite=args.overwrite)
    if args.onnx:
        results = predict_video_onnx(args.onnx, inputs, args.out, args.threshold, **common)
    else:
        results = predict_video_checkpoint(args.checkpoint, inputs, args.out, args.threshold, config_path=args.config,
                                           overrides=overrides, device=args.device,
                                           batched_backbone=args.batched_backbone, **common)
    for r in results:
        stopped = " (stopped; what was written is kept)" if r.stopped_by is not None else ""
        print(f"{r.source}: {r.frames} frames at {r.frames_per_second:.1f} frames/s, {r.detections} detections >= "
              f"{args.threshold}{stopped}: {r.video}, {r.lines}")
    stopped = next((r.stopped_by for r in results if r.stopped_by is not None), None)
    return 0 if stopped is None else 128 + stopped


def run(args) -> int:
    inputs, overrides = options.split_items(args.items)
    if not inputs:
        raise UsageError("no images given: pass image files or folders (before or after the options)")
    if args.onnx and (args.config or overrides or args.batched_backbone):
        raise UsageError("--config, KEY=VALUE overrides and --batched-backbone apply to --checkpoint; an ONNX "
                         "model carries its preprocessing in its .json")
    videos = [_is_video_input(item) for item in inputs]
    if any(videos) and not all(videos):
        raise UsageError("images and videos in one run: predict them in two runs (videos: "
                         + ", ".join(i for i, v in zip(inputs, videos) if v) + ")")
    if all(videos):
        return _run_video(args, inputs, overrides)
    if args.every != 1 or args.max_frames is not None:
        raise UsageError("--every and --max-frames apply to videos")
    if args.onnx:
        results = predict_onnx(args.onnx, inputs, args.out, args.threshold, batch_size=args.batch_size,
                               overwrite=args.overwrite, recursive=args.recursive)
    else:
        results = predict_path(args.checkpoint, inputs, args.out, args.threshold, config_path=args.config,
                               overrides=overrides, device=args.device, batch_size=args.batch_size,
                               batched_backbone=args.batched_backbone, overwrite=args.overwrite,
                               recursive=args.recursive)
    total = sum(len(r["detections"]) for r in results)
    skipped = sum("error" in r for r in results)
    note = f" ({skipped} skipped, each named above)" if skipped else ""
    print(f"{len(results) - skipped} images{note}, {total} detections >= {args.threshold}: "
          f"pictures and detections.json in {args.out}")
    return 0
