"""Reading video: a file, a webcam or a stream URL, decoded frame by frame into the ``(3, H, W)``
uint8 RGB tensors every image path gives (:mod:`detr_irpe.data.images`).

Decoding is PyAV's (FFmpeg; the ``[video]`` extra, imported when a video is opened). Its wheels
carry FFmpeg with an H.264 encoder, read webcams and network streams, and encode frame by frame,
which a stream that ends on Ctrl-C needs (README: why PyAV rather than torchcodec).

A source is one of (:func:`video_source`):

- a video file (:data:`VIDEO_EXTENSIONS`), or a folder of them (:func:`list_videos`);
- a webcam: its index (``0``) or its device (``/dev/video0``);
- a stream URL: ``rtsp://``, ``rtmp://``, ``http(s)://``, ``udp://``, ``tcp://``, ``srt://``, ``file:``
  (a file read as a stream: no frame count, no seeking).

Frame ``k``'s RGB values are FFmpeg's conversion of the decoded frame (swscale, the colour space
and range the stream declares), so the same file gives the same tensors to ``predict`` and to any
other reader of this module.
"""
from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Iterator, List, Optional
from urllib.parse import urlparse

import numpy as np
import torch

from ..errors import DetrIrpeError, InputNotFoundError, UsageError
from ..optional import require

VIDEO_EXTENSIONS = {".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".mpg", ".mpeg", ".ts", ".mts", ".m2ts",
                    ".flv", ".wmv", ".ogv", ".3gp", ".y4m"}
STREAM_SCHEMES = ("rtsp", "rtsps", "rtmp", "rtmps", "http", "https", "udp", "tcp", "srt", "file")
OPEN_TIMEOUT_S = 10.0  # a stream or camera that sends nothing for this long is an error, not a hang
FEATURE = "predict on video"


class VideoDecodeError(DetrIrpeError, ValueError):
    """A video source cannot be opened or decoded: not a video, truncated, no video stream, a
    stream that stopped sending."""


@dataclass(frozen=True)
class VideoSource:
    """Where frames come from.

    Attributes:
        kind: ``"file"``, ``"webcam"`` or ``"stream"``.
        location: the file's path, the camera's device, the stream's URL.
        name: a stem for output files (``clip`` for ``clip.mp4``, ``webcam0``, the URL's last path part).
    """

    kind: str
    location: str
    name: str

    @property
    def live(self) -> bool:
        """A webcam or a stream: frames keep coming until it ends or is stopped (no known count)."""
        return self.kind != "file"


@dataclass
class Frame:
    """One decoded frame: its index in the source (from 0), its time in seconds from the source's
    first frame, and ``image``, ``(3, H, W)`` uint8 RGB."""

    index: int
    time: float
    image: torch.Tensor


def is_video_file(path) -> bool:
    return Path(path).suffix.lower() in VIDEO_EXTENSIONS


def is_stream_url(item: str) -> bool:
    scheme = urlparse(str(item)).scheme.lower()
    return scheme in STREAM_SCHEMES and (scheme == "file" or "://" in str(item))


def is_webcam(item: str) -> bool:
    """A webcam index (``0``, ``1``) or a Linux video device (``/dev/video0``)."""
    item = str(item)
    return item.isdigit() or item.startswith("/dev/video")


def list_videos(path) -> List[Path]:
    """``path`` itself if it is a file, else the video files in the folder (:data:`VIDEO_EXTENSIONS`), sorted."""
    path = Path(path)
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if is_video_file(p) and p.is_file())
        if not files:
            raise InputNotFoundError(f"no video files ({', '.join(sorted(VIDEO_EXTENSIONS))}) in folder {path}")
        return files
    raise InputNotFoundError(f"no such video or folder: {path}")


def video_source(item) -> VideoSource:
    """What ``item`` names (see the module docstring); an existing file or folder wins over the other readings."""
    text = str(item)
    if Path(text).is_file() and not text.startswith("/dev/video"):
        return VideoSource("file", text, Path(text).stem)
    if is_webcam(text):
        device = text if text.startswith("/dev/") else _camera_device(int(text))
        return VideoSource("webcam", device, "webcam" + "".join(c for c in text if c.isdigit()))
    if is_stream_url(text):
        stem = Path(urlparse(text).path).stem or urlparse(text).hostname or "stream"
        return VideoSource("stream", text, stem)
    raise InputNotFoundError(f"no such video file: {text} (a video is a file, a folder of videos, a webcam index "
                             f"such as 0, or a stream URL: {', '.join(s + '://' for s in STREAM_SCHEMES[:-1])})")


def _camera_device(index: int) -> str:
    """The name FFmpeg opens webcam ``index`` by on this system."""
    if sys.platform.startswith("linux"):
        return f"/dev/video{index}"
    if sys.platform == "darwin":
        return str(index)
    raise UsageError(f"a webcam by index works on Linux and macOS; on {sys.platform} pass a stream URL or a file")


def _input_format(source: VideoSource) -> Optional[str]:
    if source.kind != "webcam":
        return None
    return "avfoundation" if sys.platform == "darwin" else "v4l2"


class VideoReader:
    """An open video source; iterate for its :class:`Frame` s, then :meth:`close` (or use ``with``).

    Attributes:
        source: the :class:`VideoSource`.
        width, height: the frames' size in pixels.
        rate: frames per second (a ``Fraction``; the stream's average rate, or its guess).
        frames: the number of frames the container declares, or None (a stream, a webcam, or a
            container that does not say).
    """

    def __init__(self, source: VideoSource):
        av = require("av", FEATURE)
        self.source = source
        if source.kind == "webcam" and source.location.startswith("/dev/") and not Path(source.location).exists():
            cameras = sorted(str(p) for p in Path("/dev").glob("video*"))
            found = f"cameras here: {', '.join(cameras)}" if cameras else "this machine has no camera device"
            raise InputNotFoundError(f"no webcam at {source.location} ({found}); pass another index, a file or a "
                                     f"stream URL")
        options = {"rtsp_transport": "tcp"} if source.location.startswith("rtsp") else {}
        try:
            self._container = av.open(source.location, format=_input_format(source), options=options,
                                      timeout=OPEN_TIMEOUT_S if source.live else None)
        except FileNotFoundError:
            raise InputNotFoundError(f"no such video: {source.location}") from None
        except (av.FFmpegError, OSError, ValueError) as e:
            raise VideoDecodeError(f"cannot open {source.location} as a video ({_reason(e)}): {_advice(source)}") from None
        if not self._container.streams.video:
            self._container.close()
            raise VideoDecodeError(f"{source.location} holds no video stream ({self._container.format.name} "
                                   f"container); pass a video file")
        self._stream = self._container.streams.video[0]
        self._stream.thread_type = "AUTO"  # frame and slice threads in the decoder
        context = self._stream.codec_context
        self.width, self.height = int(context.width), int(context.height)
        if self.width <= 0 or self.height <= 0:
            self._container.close()
            raise VideoDecodeError(f"{source.location}: its video stream has no frame size (truncated or corrupt); "
                                   f"{_advice(source)}")
        self.rate = Fraction(self._stream.average_rate or self._stream.guessed_rate or 25)
        self.frames = int(self._stream.frames) if self._stream.frames and not source.live else None
        self._av = av

    def __iter__(self) -> Iterator[Frame]:
        return self.read()

    def read(self, every: int = 1) -> Iterator[Frame]:
        """The frames whose index is divisible by ``every`` (the others are decoded, as they must be,
        but not converted to RGB)."""
        start = None
        index = -1
        try:
            for frame in self._container.decode(self._stream):
                index += 1
                time = float(frame.time) if frame.time is not None else index / float(self.rate)
                start = time if start is None else start
                if index % every == 0:
                    yield Frame(index, time - start, _planar_rgb(frame))
        except self._av.FFmpegError as e:
            raise VideoDecodeError(f"decoding {self.source.location} failed after {index + 1} frames "
                                   f"({_reason(e)}): the file is truncated or corrupt") from None
        if index < 0:
            raise VideoDecodeError(f"{self.source.location} gave no frame (an empty or truncated video): "
                                   f"{_advice(self.source)}")
        missing = 0 if self.frames is None else self.frames - (index + 1)
        if missing > max(2, self.frames // 20):  # FFmpeg ends a cut file quietly
            raise VideoDecodeError(f"{self.source.location} ended after {index + 1} of the {self.frames} frames its "
                                   f"header declares: the file is truncated")
        if missing > 0:  # a header may count a few frames an edit list drops (phone videos)
            warnings.warn(f"{self.source.location} gave {index + 1} of the {self.frames} frames its header declares",
                          stacklevel=2)

    def close(self) -> None:
        self._container.close()

    def __enter__(self) -> "VideoReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _planar_rgb(frame) -> torch.Tensor:
    """A decoded PyAV frame as ``(3, H, W)`` uint8 RGB.

    FFmpeg converts to planar GBR (the same values as packed RGB: swscale's one conversion), whose
    planes are copied as they are: a packed ``(H, W, 3)`` array permuted to ``(3, H, W)`` costs a
    strided copy about 15x slower than the decoding itself. ``threads=1``: swscale's own threads
    cost more than they give beside a decoder and a model.
    """
    planar = frame.reformat(format="gbrp", threads=1)
    height, width = planar.height, planar.width
    g, b, r = (np.frombuffer(plane, np.uint8).reshape(height, plane.line_size)[:, :width] for plane in planar.planes)
    return torch.from_numpy(np.stack([r, g, b]))


def _reason(error: Exception) -> str:
    return str(getattr(error, "strerror", None) or error).strip()


def _advice(source: VideoSource) -> str:
    if source.kind == "file":
        return "it is not a video FFmpeg can read, or it is truncated or corrupt; replace it or leave it out"
    if source.kind == "webcam":
        return "check that the camera is connected and not in use by another program"
    return "check the URL, that the stream is running and that this machine can reach it"


def open_video(item) -> VideoReader:
    """Open ``item`` (a path, webcam index or URL, or a :class:`VideoSource`) for reading.

    Raises:
        InputNotFoundError: no such file, or no camera at that index.
        VideoDecodeError: it cannot be opened as a video (not a video, truncated, no video stream,
            a stream that cannot be reached or sends nothing for :data:`OPEN_TIMEOUT_S` seconds).
        MissingExtraError: PyAV is not installed (``pip install "detr_irpe[video]"``).
    """
    return VideoReader(item if isinstance(item, VideoSource) else video_source(item))


def read_video_frames(item, limit: Optional[int] = None) -> List[Frame]:
    """The first ``limit`` frames (all by default) of a video, in memory."""
    frames = []
    with open_video(item) as reader:
        for frame in reader:
            if limit is not None and len(frames) >= limit:
                break
            frames.append(frame)
    return frames
