"""Errors raised while reading a dataset. Each message names the file and says what to do."""
from __future__ import annotations


class DatasetNotFoundError(FileNotFoundError):
    """An annotation file, image folder or image file does not exist."""


class AnnotationError(ValueError):
    """An annotation file exists but is not a usable COCO detection file (or holds no images)."""


class ImageDecodeError(ValueError):
    """An image file exists but cannot be decoded, or its size disagrees with the annotation file."""


class DataItemError(RuntimeError):
    """Loading one item failed; the message names its index, image id and file (the cause is chained)."""


class DataLoaderWorkerError(RuntimeError):
    """A DataLoader worker process died (killed by a signal, e.g. out of memory); names the items it was loading."""
