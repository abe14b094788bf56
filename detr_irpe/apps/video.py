"""Predict on video: a file, a folder of videos, a webcam or a stream, frame by frame through the
same detector as images (PyTorch or ONNX Runtime). Per source it writes

- ``<name>.mp4``: the frames with their boxes drawn (H.264, the source's size; its average frame
  rate, divided by ``every``), and
- ``<name>.jsonl``: one JSON line per predicted frame, ``{"index", "timestamp", "detections"}``:
  the frame's index in the source (from 0), its time in seconds from the first frame, and its
  detections in COCO's results format with the class name, ``{"bbox": [x, y, w, h], "category_id",
  "score", "name"}`` (a segmentation model adds ``"segmentation"``, COCO RLE), best first.

Decoding, inference and drawing + encoding run at the same time (a decoding thread, the model in
the calling thread, a writing thread, joined by small queues), so the slowest of the three sets the
pace. Both files are written under temporary names and renamed when the source ends, or when
SIGINT (Ctrl-C) or SIGTERM stops the run: what was written is kept, and the MP4 is complete
(its index written), so it plays.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import queue
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor
from torchvision.ops import box_convert
from tqdm import tqdm

from ..data.video import FEATURE, OPEN_TIMEOUT_S, Frame, VideoDecodeError, VideoReader, VideoSource, list_videos, open_video, video_source
from ..errors import UsageError
from ..engine.distributed import pick_device
from ..engine.inference import load_detector
from ..evaluation import encode_masks
from ..export import OnnxDetector, detection_records
from ..files import OutputError, check_writable, describe_os_error, output_mode, refuse_existing, refuse_inputs, same_file
from ..optional import require
from ..visualize import draw_detections
from .predict import ImageDetector, output_names

VIDEO_SUFFIX = ".mp4"
LINES_SUFFIX = ".jsonl"
QUEUED_BATCHES = 2  # batches each queue holds: enough to keep every stage busy, little memory
ENCODER_OPTIONS = {"preset": "veryfast", "crf": "20"}  # libx264: light on the CPU the model needs


@dataclass
class VideoResult:
    """What one source gave: the files written, frames predicted, detections kept, wall time, and
    ``stopped_by``: the signal that ended the run (SIGINT / SIGTERM), or None."""

    source: str
    video: Path
    lines: Path
    frames: int = 0
    detections: int = 0
    seconds: float = 0.0
    stopped_by: Optional[int] = None

    @property
    def frames_per_second(self) -> float:
        return self.frames / self.seconds if self.seconds > 0 else 0.0


class _Stopped(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived (a KeyboardInterrupt: nothing on the way catches it as an error)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


@contextlib.contextmanager
def _stop_on_signals():
    """SIGINT and SIGTERM raise :class:`_Stopped` in the main thread, once; a second signal while
    the outputs are being closed acts as it would have without this."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

    def stop(signum, frame):
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        raise _Stopped(signum)

    for sig in previous:
        signal.signal(sig, stop)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# -- writing --------------------------------------------------------------------------------


def _temporary_beside(path: Path) -> Path:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    return Path(tmp)


def _publish(tmp: Path, path: Path) -> None:
    os.chmod(tmp, output_mode())
    os.replace(tmp, path)


class AnnotatedVideoWriter:
    """``(3, H, W)`` uint8 frames into an MP4 of that size at ``rate`` frames per second, written
    under a temporary name in ``path``'s folder and renamed to ``path`` by :meth:`close`.

    H.264 (libx264), 4:2:0 chroma; a frame with an odd side (which 4:2:0 cannot hold) is kept at
    its size with 4:4:4 chroma, which some players (browsers) do not play.
    """

    def __init__(self, path, width: int, height: int, rate):
        self._av = require("av", FEATURE)
        self.path = Path(path)
        self._tmp = _temporary_beside(self.path)
        self._container = self._av.open(str(self._tmp), "w", format="mp4")
        try:
            self._stream = self._container.add_stream("libx264", rate=rate, options=dict(ENCODER_OPTIONS))
            self._stream.width, self._stream.height = width, height
            self._stream.pix_fmt = "yuv420p" if width % 2 == 0 and height % 2 == 0 else "yuv444p"
        except BaseException:
            self.discard()
            raise
        self.written = 0

    def write(self, image: Tensor) -> None:
        # numpy's copy to (H, W, 3) (none when drawing left it so) is ~10x faster than torch's for uint8
        frame = self._av.VideoFrame.from_ndarray(np.ascontiguousarray(image.permute(1, 2, 0).numpy()), format="rgb24")
        for packet in self._stream.encode(frame):
            self._container.mux(packet)
        self.written += 1

    def close(self) -> Path:
        """Flush the encoder, write the MP4's index and rename the file to :attr:`path`."""
        for packet in self._stream.encode():
            self._container.mux(packet)
        self._container.close()
        _publish(self._tmp, self.path)
        return self.path

    def discard(self) -> None:
        """Leave nothing behind (after a failure)."""
        with contextlib.suppress(Exception):
            self._container.close()
        with contextlib.suppress(OSError):
            self._tmp.unlink()


class JsonLinesWriter:
    """One JSON value per line into ``path``, under a temporary name until :meth:`close`."""

    def __init__(self, path):
        self.path = Path(path)
        self._tmp = _temporary_beside(self.path)
        self._file = open(self._tmp, "w", encoding="utf-8")

    def write(self, value) -> None:
        self._file.write(json.dumps(value) + "\n")

    def close(self) -> Path:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        _publish(self._tmp, self.path)
        return self.path

    def discard(self) -> None:
        with contextlib.suppress(OSError):
            self._file.close()
            self._tmp.unlink()


def coco_records(det: Dict[str, Tensor], threshold: float, categories: Dict[int, str]) -> Tuple[List[dict], List[dict]]:
    """A frame's detections at least ``threshold``, best first: ``(records, coco)``, the records of
    :func:`~detr_irpe.export.detection_records` (masks as tensors) and the same in COCO's results format
    (``bbox`` as ``[x, y, w, h]``, ``category_id``, ``score``, ``name``; ``segmentation`` as RLE)."""
    records = detection_records(det, threshold, categories)
    boxes = box_convert(torch.tensor([r["box"] for r in records]).reshape(-1, 4), "xyxy", "xywh").tolist()
    coco = [{"bbox": box, "category_id": r["label"], "score": r["score"], "name": r["name"]}
            for box, r in zip(boxes, records)]
    if records and "mask" in records[0]:
        for entry, rle in zip(coco, encode_masks(torch.stack([r["mask"] for r in records]))):
            entry["segmentation"] = rle
    return records, coco


def annotate(image: Tensor, records: Sequence[dict], categories: Dict[int, str]) -> Tensor:
    """``image`` with ``records`` (:func:`coco_records`' first list) drawn: boxes, names, scores, masks."""
    masks = torch.stack([r["mask"] for r in records]) if records and "mask" in records[0] else None
    return draw_detections(image, torch.tensor([r["box"] for r in records]).reshape(-1, 4),
                           torch.tensor([r["label"] for r in records], dtype=torch.long),
                           torch.tensor([r["score"] for r in records]), categories, masks=masks)


# -- the pipeline ---------------------------------------------------------------------------

_END = object()


class _Failed:
    def __init__(self, error: BaseException):
        self.error = error


def _put(q: "queue.Queue", item, stop: threading.Event, consumer: Optional[threading.Thread] = None) -> bool:
    """``q.put(item)``, given up when ``stop`` is set or the ``consumer`` thread has ended."""
    while not stop.is_set() and (consumer is None or consumer.is_alive()):
        try:
            q.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False


def _decode(reader: VideoReader, every: int, max_frames: Optional[int], out: "queue.Queue",
            stop: threading.Event) -> None:
    """Decoding thread: the frames to predict (index divisible by ``every``, at most ``max_frames``)."""
    try:
        taken = 0
        for frame in reader.read(every):
            if stop.is_set() or (max_frames is not None and taken >= max_frames):
                break
            taken += 1
            _put(out, frame, stop)
    except BaseException as e:  # handed to the main thread, which raises it
        _put(out, _Failed(e), stop)
    _put(out, _END, stop)


class _Writer(threading.Thread):
    """Writing thread: draws each predicted frame, encodes it and writes its JSON line."""

    def __init__(self, video: AnnotatedVideoWriter, lines: JsonLinesWriter, threshold: float,
                 categories: Dict[int, str], bar: tqdm):
        super().__init__(name="video-writer", daemon=True)
        self.inbox: "queue.Queue" = queue.Queue(maxsize=QUEUED_BATCHES)
        self.video, self.lines, self.threshold, self.categories, self.bar = video, lines, threshold, categories, bar
        self.detections = 0
        self.error: Optional[BaseException] = None

    def run(self) -> None:
        try:
            while (item := self.inbox.get()) is not _END:
                for frame, det in zip(*item):
                    records, coco = coco_records(det, self.threshold, self.categories)
                    self.video.write(annotate(frame.image, records, self.categories))
                    self.lines.write({"index": frame.index, "timestamp": round(frame.time, 6), "detections": coco})
                    self.detections += len(coco)
                    self.bar.update(1)
        except BaseException as e:  # the main thread raises it
            self.error = e


def _expected_frames(reader: VideoReader, every: int, max_frames: Optional[int]) -> Optional[int]:
    count = math.ceil(reader.frames / every) if reader.frames else None
    if max_frames is not None:
        count = max_frames if count is None else min(count, max_frames)
    return count


def _check_size(detector: ImageDetector, reader: VideoReader) -> None:
    """An ONNX export refuses frames whose resized size is outside its range: say so before any work."""
    problem_of = getattr(detector, "image_problem", None)
    problem = problem_of(torch.empty(3, reader.height, reader.width, dtype=torch.uint8)) if problem_of else None
    if problem is not None:
        raise UsageError(f"cannot predict {reader.source.location}: {problem}")


def predict_video(detector: ImageDetector, source: Union[str, VideoSource], video_path, lines_path,
                  threshold: float = 0.7, batch_size: int = 1, every: int = 1,
                  max_frames: Optional[int] = None) -> VideoResult:
    """Predict every ``every``-th frame of ``source`` (at most ``max_frames`` of them), ``batch_size``
    frames per model call; write the annotated video to ``video_path`` and the JSON lines to
    ``lines_path`` (see the module docstring). A progress bar on stderr counts frames per second.

    A signal (Ctrl-C, SIGTERM) ends it early: the outputs keep the frames written, and
    ``stopped_by`` names the signal. Outputs are not checked here (:func:`predict_videos` does).

    Raises:
        VideoDecodeError: the source cannot be decoded; when it fails part way, the outputs of the
            frames before are kept and the message says so.
    """
    if every < 1 or batch_size < 1 or (max_frames is not None and max_frames < 1):
        raise UsageError(f"every, batch_size and max_frames must be at least 1, got {every}, {batch_size}, {max_frames}")
    source = source if isinstance(source, VideoSource) else video_source(source)
    result = VideoResult(source.location, Path(video_path), Path(lines_path))
    started = time.perf_counter()
    reader = open_video(source)
    try:
        _check_size(detector, reader)
        video = AnnotatedVideoWriter(video_path, reader.width, reader.height, reader.rate / every)
    except BaseException:
        reader.close()
        raise
    lines = JsonLinesWriter(lines_path)
    # disable=None: no bar when stderr is not a terminal
    bar = tqdm(total=_expected_frames(reader, every, max_frames), desc=source.name, unit="frame",
               file=sys.stderr, disable=None, leave=False)
    writer = _Writer(video, lines, threshold, detector.categories, bar)
    stop = threading.Event()
    decoded: "queue.Queue" = queue.Queue(maxsize=QUEUED_BATCHES * batch_size)
    decoder = threading.Thread(target=_decode, args=(reader, every, max_frames, decoded, stop),
                               name="video-decoder", daemon=True)
    failure: Optional[BaseException] = None
    writer.start()
    decoder.start()
    try:
        with _stop_on_signals():
            while failure is None:
                batch: List[Frame] = []
                while len(batch) < batch_size:
                    item = decoded.get()
                    if item is _END or isinstance(item, _Failed):
                        failure = getattr(item, "error", _END)
                        break
                    batch.append(item)
                if batch:
                    _put(writer.inbox, (batch, detector.detect([f.image for f in batch])), stop, writer)
                if writer.error is not None:
                    break
    except _Stopped as e:
        result.stopped_by = e.signum
    except BaseException:
        _finish(stop, writer, decoder, reader, bar)
        video.discard()
        lines.discard()
        raise
    _finish(stop, writer, decoder, reader, bar)
    failure = None if failure is _END else failure
    if writer.error is not None or (failure is not None and not video.written):
        video.discard()
        lines.discard()
        raise writer.error or failure
    try:
        video.close()
        lines.close()
    except OSError as e:
        video.discard()
        lines.discard()
        raise OutputError(describe_os_error(e, video_path)) from None
    result.frames, result.detections = video.written, writer.detections
    result.seconds = time.perf_counter() - started
    if isinstance(failure, VideoDecodeError):
        raise VideoDecodeError(f"{failure} ({result.frames} frames before it are in {video_path} and {lines_path})")
    if failure is not None:
        raise failure
    return result


def _finish(stop: threading.Event, writer: _Writer, decoder: threading.Thread, reader: VideoReader,
            bar: tqdm) -> None:
    """Stop decoding, let the writer drain what was predicted, close the source."""
    stop.set()
    if writer.is_alive():
        writer.inbox.put(_END)
        writer.join()
    decoder.join(timeout=OPEN_TIMEOUT_S + 1)  # a stalled stream gives up at its read timeout
    if not decoder.is_alive():  # else the daemon thread still reads it: closing under it could crash
        reader.close()
    bar.close()


# -- sources and outputs --------------------------------------------------------------------


def video_inputs(inputs: Sequence) -> List[VideoSource]:
    """The sources of ``inputs``: video files, folders of them (their videos, sorted), webcams,
    stream URLs (:func:`~detr_irpe.data.video.video_source`); a file given twice counts once."""
    sources, seen = [], set()
    for item in inputs:
        items = list_videos(item) if not isinstance(item, VideoSource) and Path(str(item)).is_dir() else [item]
        for one in items:
            source = one if isinstance(one, VideoSource) else video_source(one)
            key = str(Path(source.location).resolve()) if source.kind == "file" else source.location
            if key not in seen:
                seen.add(key)
                sources.append(source)
    return sources


def output_stems(sources: Sequence[VideoSource]) -> List[str]:
    """A unique output stem per source: files as predict names pictures (``clip``, ``clip_mp4`` beside
    ``clip_mkv``), live sources by their name, numbered when shared."""
    return output_names([Path(s.location) if s.kind == "file" else Path(s.name) for s in sources], suffix="")


def check_video_outputs(sources: Sequence[VideoSource], out_dir: Path, stems: Sequence[str],
                        overwrite: bool = False) -> List[Tuple[Path, Path]]:
    """Before any work: ``(video, lines)`` paths per source in ``out_dir``, which must not be the folder
    of an input video, replace an input, or (without ``overwrite``) replace an earlier run's files."""
    files = [Path(s.location) for s in sources if s.kind == "file"]
    for path in files:
        if out_dir.is_dir() and same_file(path.parent, out_dir):
            raise UsageError(f"--out {out_dir} is the folder of the input video {path}: choose another folder, "
                             f"e.g. --out {out_dir / 'predictions'}")
    outputs = [(out_dir / (stem + VIDEO_SUFFIX), out_dir / (stem + LINES_SUFFIX)) for stem in stems]
    flat = [p for pair in outputs for p in pair]
    refuse_inputs(flat, files, "choose another --out")
    if not overwrite:
        refuse_existing(flat, "pass --overwrite to replace them, or choose another --out")
    check_writable(out_dir, "--out")
    return outputs


def predict_videos(detector: ImageDetector, inputs: Sequence, out_dir, threshold: float = 0.7, *,
                   batch_size: int = 1, every: int = 1, max_frames: Optional[int] = None,
                   overwrite: bool = False) -> List[VideoResult]:
    """:func:`predict_video` for each source of ``inputs`` (:func:`video_inputs`), into ``out_dir``
    (``<stem>.mp4`` and ``<stem>.jsonl`` each, :func:`output_stems`). Every output is checked before
    the first frame (:func:`check_video_outputs`). A signal ends the current source, keeping its
    outputs, and the run: the sources after it are not predicted."""
    out_dir = Path(out_dir)
    sources = video_inputs(inputs)
    outputs = check_video_outputs(sources, out_dir, output_stems(sources), overwrite)
    results = []
    for source, (video_path, lines_path) in zip(sources, outputs):
        results.append(predict_video(detector, source, video_path, lines_path, threshold, batch_size, every,
                                     max_frames))
        if results[-1].stopped_by is not None:
            break
    return results


def predict_video_checkpoint(checkpoint: str, inputs: Sequence, out_dir, threshold: float = 0.7, *,
                             config_path=None, overrides: Sequence[str] = (), device: str = "auto",
                             batched_backbone: bool = False, **options) -> List[VideoResult]:
    """Load a checkpoint (as ``predict`` does) and :func:`predict_videos` with it; ``options``:
    ``batch_size``, ``every``, ``max_frames``, ``overwrite``."""
    require("av", FEATURE)  # before the model loads
    out_dir = Path(out_dir)
    sources = video_inputs(inputs)
    check_video_outputs(sources, out_dir, output_stems(sources), options.get("overwrite", False))
    detector = load_detector(checkpoint, config_path, overrides, device=pick_device(device))
    detector.batched_backbone = batched_backbone
    return predict_videos(detector, sources, out_dir, threshold, **options)


def predict_video_onnx(model_path, inputs: Sequence, out_dir, threshold: float = 0.7, **options) -> List[VideoResult]:
    """:func:`predict_videos` with an exported ONNX model run by ONNX Runtime."""
    require("av", FEATURE)  # before the model loads
    out_dir = Path(out_dir)
    sources = video_inputs(inputs)
    check_video_outputs(sources, out_dir, output_stems(sources), options.get("overwrite", False))
    return predict_videos(OnnxDetector(model_path), sources, out_dir, threshold, **options)
