"""Writing the files a user keeps: atomically, with the umask's permissions, never over a file the
user did not ask to replace, and with operating-system failures (no permission, a full disk, a
file where a folder should be) as messages that name the path and what to do.

The rules every command follows (README, "What is written where"):

* a file is written to a temporary name in its folder, then renamed: a crash, a full disk or a
  kill leaves the previous file (or none) at the path, never half of one;
* new files get the permissions the umask gives (``0666 & ~umask``), like any file the user makes;
* an existing file is replaced only when the user said so (``--overwrite``, ``--resume``), and a
  command's own inputs are never replaced, not even then.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, List, Optional, Union

from .errors import DetrIrpeError

PathLike = Union[str, os.PathLike]
_LISTED = 5  # existing files named in a refusal


class OutputError(DetrIrpeError, OSError):
    """A file or folder cannot be written: no permission, a read-only or full disk, a file in the way."""


class OutputExistsError(DetrIrpeError, FileExistsError):
    """Writing would replace files the user did not ask to replace (or the command's own inputs)."""


def output_mode() -> int:
    """The permission bits a new file gets from the umask (``0o644`` with the usual ``022``)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _human(size: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB", "TB"):
        if size < 1024 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "bytes" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TB"


def free_space(folder: PathLike) -> Optional[int]:
    """Bytes free on the file system holding ``folder`` (or its nearest existing parent)."""
    folder = Path(folder).absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def describe_os_error(error: OSError, path: PathLike, action: str = "write") -> str:
    """``cannot <action> <path>: <why>. <what to do>`` for an ``OSError`` met while writing ``path``."""
    path = Path(path)
    folder = _nearest_existing(path.parent)
    code = error.errno
    if code in (errno.ENOSPC, errno.EDQUOT):
        free = free_space(folder)
        left = f" ({_human(free)} free on the disk holding {folder})" if free is not None else ""
        why = "the disk is full" if code == errno.ENOSPC else "the disk quota is exceeded"
        return f"cannot {action} {path}: {why}{left}. Free some space or choose another folder"
    if code in (errno.EACCES, errno.EPERM):
        return f"cannot {action} {path}: no permission to write in {folder}. Choose a folder you can write to"
    if code == errno.EROFS:
        return f"cannot {action} {path}: {folder} is on a read-only file system. Choose another folder"
    if code == errno.EFBIG:
        return (f"cannot {action} {path}: the file would exceed the largest file size allowed here "
                f"(`ulimit -f`, or the file system's limit). Raise the limit or choose another folder")
    if code in (errno.ENOTDIR, errno.EEXIST) and folder.exists() and not folder.is_dir():
        return f"cannot {action} {path}: {folder} is a file, not a folder. Choose another path"
    return f"cannot {action} {path}: {error.strerror or error}"


def _nearest_existing(path: Path) -> Path:
    """``path`` or its nearest ancestor that exists."""
    for candidate in [path, *path.parents]:
        if candidate.exists():
            return candidate
    return path


def make_folder(folder: PathLike, what: str = "output folder") -> Path:
    """Create ``folder`` (and its parents) if needed; :class:`OutputError` naming ``what`` (e.g.
    ``train.output_dir``) if it is a file or cannot be created."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise OutputExistsError(f"{what} {folder} is a file, not a folder: choose a folder (it need not exist)")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"{what}: {describe_os_error(e, folder, 'create')}") from None
    return folder


def check_writable(folder: PathLike, what: str = "output folder") -> Path:
    """Create ``folder`` and prove a file can be written in it (a probe file, removed again), so
    that a run fails before its work, not when it saves. Returns the folder."""
    folder = make_folder(folder, what)
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-test.", dir=folder)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise OutputError(f"{what}: {describe_os_error(e, folder / '.write-test')}") from None
    return folder


class _Recorder:
    """A binary file wrapper that keeps the ``OSError`` of a failed write: ``torch.save`` turns it
    into ``RuntimeError: ... unexpected pos``, which no longer says the disk was full."""

    def __init__(self, file: BinaryIO):
        self.file = file
        self.error: Optional[OSError] = None

    def write(self, data) -> int:
        try:
            return self.file.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        try:
            self.file.flush()
        except OSError as e:
            self.error = e
            raise

    def __getattr__(self, name):  # tell, seek, fileno, ... of the file itself
        return getattr(self.file, name)


def atomic_write(path: PathLike, write: Callable[[BinaryIO], None]) -> Path:
    """Call ``write(file)`` on a temporary file beside ``path``, then rename it to ``path``.

    The file gets the umask's permissions. On any failure the temporary file is removed and
    ``path`` keeps what it held; an ``OSError`` (a full disk, no permission) becomes an
    :class:`OutputError` naming the path and the free space.
    """
    path = Path(path)
    make_folder(path.parent)
    recorder: Optional[_Recorder] = None
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as file:
            recorder = _Recorder(file)
            write(recorder)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(tmp, output_mode())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)
        cause = recorder.error if recorder is not None and recorder.error is not None else e
        if isinstance(cause, OSError) and not isinstance(cause, DetrIrpeError):
            raise OutputError(describe_os_error(cause, path) + (
                f"; {path} is unchanged" if path.exists() else "")) from e
        raise
    return path


def atomic_write_text(path: PathLike, text: str) -> Path:
    """:func:`atomic_write` of a UTF-8 text."""
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def atomic_write_json(path: PathLike, value, indent: Optional[int] = None) -> Path:
    """:func:`atomic_write` of ``value`` as JSON."""
    return atomic_write_text(path, json.dumps(value, indent=indent) + ("\n" if indent is not None else ""))


def append_line(path: PathLike, line: str) -> None:
    """Append one line (a log record); an ``OSError`` becomes an :class:`OutputError`."""
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(line.rstrip("\n") + "\n")
    except OSError as e:
        raise OutputError(describe_os_error(e, path)) from None


def same_file(a: PathLike, b: PathLike) -> bool:
    """Whether two paths name the same file or folder (links and ``..`` resolved)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return Path(a).resolve() == Path(b).resolve()


def refuse_existing(paths: Iterable[PathLike], how_on: str) -> None:
    """Raise :class:`OutputExistsError` listing the ``paths`` that exist; ``how_on`` says what the
    user can do (e.g. "pass --overwrite to replace them, or choose another --out")."""
    existing: List[Path] = [Path(p) for p in paths if os.path.lexists(p)]
    if existing:
        shown = ", ".join(str(p) for p in existing[:_LISTED])
        more = f" and {len(existing) - _LISTED} more" if len(existing) > _LISTED else ""
        noun = "file exists" if len(existing) == 1 else f"{len(existing)} files exist"
        raise OutputExistsError(f"{noun} already: {shown}{more}; {how_on}")


def refuse_inputs(outputs: Iterable[PathLike], inputs: Iterable[PathLike], how_on: str) -> None:
    """Raise :class:`OutputExistsError` if an output path is one of the command's input files."""
    inputs = [Path(p) for p in inputs if os.path.exists(p)]
    for out in outputs:
        for given in inputs:
            if os.path.exists(out) and same_file(out, given):
                raise OutputExistsError(f"{out} is an input of this command and would be overwritten; {how_on}")


def fresh_folder(base: PathLike) -> Path:
    """``base`` if it does not exist or is empty, else the first of ``base-2``, ``base-3``, ... that
    is: a default output folder that never replaces an earlier run."""
    base = Path(base)
    candidate, n = base, 1
    while candidate.exists() and (not candidate.is_dir() or any(candidate.iterdir())):
        n += 1
        candidate = base.with_name(f"{base.name}-{n}")
    return candidate
