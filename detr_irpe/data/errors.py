"""Errors raised while reading a dataset. Each message names the file and says what to do."""
from __future__ import annotations

from ..errors import DetrIrpeError


class DatasetNotFoundError(DetrIrpeError, FileNotFoundError):
    """An annotation file, image folder or image file does not exist."""


class AnnotationError(DetrIrpeError, ValueError):
    """An annotation file exists but is not a usable COCO detection file (or holds no images)."""


class ImageDecodeError(DetrIrpeError, ValueError):
    """An image file exists but cannot be decoded, or its size disagrees with the annotation file."""


class DataItemError(DetrIrpeError, RuntimeError):
    """Loading one item failed; the message names its index, image id and file (the cause is chained)."""


class DataLoaderWorkerError(DetrIrpeError, RuntimeError):
    """A DataLoader worker process died (killed by a signal, e.g. out of memory); names the items it was loading."""


class DataRootInUseError(DetrIrpeError, FileExistsError):
    """A folder meant for generated data already holds other files."""
