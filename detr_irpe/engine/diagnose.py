"""Why a file does not load as a checkpoint, read from the file itself without running any of it:
not a PyTorch file at all, a pickle that names code to import and call, or a damaged file.

``torch.load(weights_only=True)`` refuses all three, with messages that tell them apart poorly
(and advise ``weights_only=False``, the one thing a user must not do with a file that runs code).
"""
from __future__ import annotations

import argparse
import codecs
import pickle
import pickletools
import zipfile
from _compat_pickle import IMPORT_MAPPING, NAME_MAPPING  # Python 2 -> 3 names, as the unpickler maps them
from pathlib import Path
from typing import List

import torch

SAFE_CLASSES = [argparse.Namespace]  # beyond torch's list: the DETR / iRPE training scripts store their args so
_ZIP, _PICKLE = b"PK\x03\x04", b"\x80"  # how torch.save's zip (PyTorch >= 1.6) and a pickle (PROTO) begin
_PICTURES = {b"\x89PNG\r\n\x1a\n": "a PNG image", b"\xff\xd8\xff": "a JPEG image"}
_STRINGS = (pickletools.pyunicode, pickletools.pystring)  # what string-pushing opcodes push


def diagnose(path: Path, error: Exception) -> str:
    """Why ``torch.load`` failed on ``path``, read from the file itself: not a PyTorch file, a pickle
    that names code to run, or a corrupt / truncated file. Nothing in the file is executed."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(64)
    if not head.startswith((_ZIP, _PICKLE)):
        return (f"{path} is not a PyTorch checkpoint: {_looks_like(head)}; torch.save writes a zip archive "
                f"(a pickle stream before PyTorch 1.6). Pass such a .pth file, or a .safetensors file")
    try:
        named = _pickled_globals(path, zipped=head.startswith(_ZIP))
    except Exception as e:  # zipfile and pickletools raise many kinds on a damaged file
        return _corrupt(path, size, f"{type(e).__name__}: {e}")
    unsafe = sorted(set(named) - _allowed_globals())
    if unsafe:
        listed = ", ".join(_quote(name) for name in unsafe[:5])
        listed += f" and {len(unsafe) - 5} more" if len(unsafe) > 5 else ""
        return (f"refusing to load {path}: its pickle names {listed}, which unpickling would import and call. "
                f"A checkpoint needs only tensors and plain containers (torch.load(weights_only=True) allows those "
                f"and argparse.Namespace, nothing else), so this file can run arbitrary code and must not be "
                f"loaded. Ask its source for a bare state dict (torch.save(model.state_dict(), path)) or a "
                f".safetensors file")
    said = f"torch.load raised {type(error).__name__}"
    if str(error) and not isinstance(error, pickle.UnpicklingError):  # whose text advises weights_only=False
        said += f": {_quote(str(error).splitlines()[0], 200)}"
    return _corrupt(path, size, said)


def _corrupt(path: Path, size: int, reason: str) -> str:
    return f"checkpoint {path} is corrupt or truncated ({size} bytes; {reason}). Download or save it again"


def _quote(text: str, limit: int = 60) -> str:
    """``text`` cut to ``limit`` characters, quoted so that no control character reaches the terminal."""
    return repr(text[:limit]) + ("..." if len(text) > limit else "")


def _looks_like(head: bytes) -> str:
    """What a file that is not a PyTorch checkpoint is, from its first bytes."""
    if not head:
        return "it is empty (0 bytes)"
    for magic, kind in _PICTURES.items():
        if head.startswith(magic):
            return f"it is {kind}"
    try:
        text = codecs.getincrementaldecoder("utf-8")().decode(head)  # a character cut at the end is no error
    except UnicodeDecodeError:
        text = ""
    if text and all(c.isprintable() or c in "\t\n\r" for c in text):
        return f"it is text (YAML, JSON or similar) starting with {_quote(text, 40)}"
    return f"it is binary data starting with the bytes {head[:8].hex(' ')}"


def _pickled_globals(path: Path, zipped: bool) -> List[str]:
    """``module.name`` of every global (class or function) the checkpoint's pickles name.

    A zip checkpoint holds one pickle, ``<name>/data.pkl``; a legacy one starts with five (magic
    number, protocol, system information, the object, storage keys), followed by raw tensor data.

    Raises:
        ValueError, zipfile.BadZipFile, ...: the archive or a pickle stream is damaged or cut short.
    """
    if zipped:
        with zipfile.ZipFile(path) as archive:
            member = next((n for n in archive.namelist() if n.rpartition("/")[2] == "data.pkl"), None)
            if member is None:
                raise ValueError("a zip archive without data.pkl")
            return _globals_in(pickletools.genops(archive.read(member)))
    named = []
    with open(path, "rb") as f:
        for _ in range(5):
            if f.peek(1)[:1] != _PICKLE:
                break
            named += _globals_in(pickletools.genops(f))  # reads exactly one pickle, up to its STOP
    return named


def _globals_in(ops) -> List[str]:
    """The globals named by the opcodes ``ops`` of :func:`pickletools.genops`, which parses and runs nothing.

    GLOBAL and INST carry ``module name``; STACK_GLOBAL takes them from the two strings pushed just
    before it, directly or from the memo (best effort: other values are tracked only as not strings).
    """
    named, pushed, memo = [], [], {}
    for op, arg, _ in ops:
        if op.name in ("GLOBAL", "INST"):
            named.append(_py3_name(*arg.split(" ", 1)))
        elif op.name == "STACK_GLOBAL" and len(pushed) > 1 and all(isinstance(v, str) for v in pushed[-2:]):
            named.append(_py3_name(pushed[-2], pushed[-1]))
        if op.name == "MEMOIZE":
            memo[len(memo)] = pushed[-1] if pushed else None
        elif "PUT" in op.name:
            memo[arg] = pushed[-1] if pushed else None
        elif op.stack_after:  # the opcode pushes a value; only strings matter
            pushed.append(arg if op.stack_after[0] in _STRINGS else memo.get(arg) if "GET" in op.name else None)
    return named


def _py3_name(module: str, name: str) -> str:
    """``module.name`` as Python 3 imports it (protocol 2 pickles spell ``builtins`` as ``__builtin__``)."""
    module, name = NAME_MAPPING.get((module, name), (IMPORT_MAPPING.get(module, module), name))
    return f"{module}.{name}"


def _allowed_globals() -> set:
    """What ``torch.load(weights_only=True)`` rebuilds here: torch's own list (the one
    ``torch.serialization.get_unsafe_globals_in_checkpoint`` compares with) and ``SAFE_CLASSES``."""
    allowed = set(torch._weights_only_unpickler._get_allowed_globals())
    return allowed | {f"{c.__module__}.{c.__qualname__}" for c in SAFE_CLASSES}
