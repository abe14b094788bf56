"""The ``detr-irpe`` console script: one subcommand per tool.

    detr-irpe train --config detr_r50_irpe_product_ctx_k_9x9 data.root=/data/coco
    detr-irpe eval --checkpoint outputs/run/checkpoint.pth --data-root /data/coco
    detr-irpe predict --checkpoint CKPT photos/ --out outputs/pred
    detr-irpe visualize boxes --checkpoint CKPT --val 4 --out outputs/viz
    detr-irpe check-data --config detr_r50 data.root=/data/coco
    detr-irpe export --checkpoint CKPT --out model.onnx
    detr-irpe demo

``tools/<name>.py`` are the same commands (``main(command=...)``). Each subcommand lives in its own
module of :mod:`detr_irpe.apps.commands`, imported only when it runs. A documented error
(:class:`detr_irpe.errors.DetrIrpeError`) is printed as ``error: <message>`` on stderr with exit code
1 and no traceback, unless ``--debug`` is given or ``DETR_IRPE_DEBUG=1`` is set. Anything else is a
bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
import warnings
from typing import Callable, List, Optional

from tqdm import tqdm

from ..errors import DetrIrpeError, TrainingStopped
from .commands import COMMANDS

DEBUG_ENV = "DETR_IRPE_DEBUG"
DESCRIPTION = ("DETR with iRPE (image relative position encoding): train, evaluate, predict, draw, export. "
               "Run detr-irpe COMMAND --help for a command's options.")


def build_parser(command: Optional[str] = None) -> argparse.ArgumentParser:
    """The ``detr-irpe`` parser; only ``command``'s module is imported (to add its arguments)."""
    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument("--debug", action="store_true",
                       help=f"show the full traceback of an error (or set {DEBUG_ENV}=1)")
    parser = argparse.ArgumentParser(prog="detr-irpe", description=DESCRIPTION, parents=[debug])
    sub = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(COMMANDS) + "}")
    for name, (help_text, module_name) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text[0].upper() + help_text[1:] + ".",
                           parents=[debug])
        if name == command:
            module = importlib.import_module(f"{__package__}.commands.{module_name}")
            module.add_arguments(p)
            p.set_defaults(run=module.run)
    return parser


def _end_progress_bars() -> None:
    """Close the progress bars still drawing, so that a message starts on a line of its own."""
    bars = [bar for bar in list(getattr(tqdm, "_instances", ())) if not bar.disable]
    for bar in bars:
        bar.close()
    if bars and not sys.stderr.isatty():  # a log file keeps the bar's text: end its line
        sys.stderr.write("\n")


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A warning as one ``warning: <message>`` line, above any progress bar."""
    tqdm.write(f"warning: {message}", file=sys.stderr)


@contextlib.contextmanager
def _one_line_warnings(debug: bool):
    if debug:
        yield
        return
    previous = warnings.showwarning
    warnings.showwarning = _show_warning
    try:
        yield
    finally:
        warnings.showwarning = previous


def _os_error_line(error: OSError) -> str:
    where = f": {error.filename}" if error.filename else ""
    return f"{error.strerror or error}{where}"


def run_guarded(run: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """``run(args)``, with a documented error printed as one ``error:`` line (exit code 1), a
    training stopped by a signal as its message (exit code 128 + the signal), an operating-system
    error on a named file (no permission, a full disk) as one line, Ctrl-C as ``interrupted``
    (130) and warnings as ``warning:`` lines, unless debugging is asked for."""
    debug = getattr(args, "debug", False) or os.environ.get(DEBUG_ENV, "").strip() not in ("", "0")
    try:
        with _one_line_warnings(debug):
            return int(run(args) or 0)
    except TrainingStopped as e:
        _end_progress_bars()
        print(str(e), file=sys.stderr, flush=True)
        return e.exit_code
    except DetrIrpeError as e:
        if debug:
            raise
        _end_progress_bars()
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    except OSError as e:
        if debug or not e.filename:
            raise
        _end_progress_bars()
        print(f"error: {_os_error_line(e)}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        if debug:
            raise
        _end_progress_bars()
        print("interrupted", file=sys.stderr, flush=True)
        return 130


def main(argv: Optional[List[str]] = None, command: Optional[str] = None) -> int:
    """Run ``detr-irpe [command] ARGS``; returns the exit code. ``command`` fixes the subcommand
    (what ``tools/<name>.py`` does), so ``argv`` holds only its arguments."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if command is not None:
        argv = [command] + argv
    named = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(named if named in COMMANDS else None)
    args, extra = parser.parse_known_args(argv)
    # argparse takes a positional list in one piece: files and KEY=VALUE given after an option come back
    # here, and belong to that list
    listed = "items" if hasattr(args, "items") else "overrides" if hasattr(args, "overrides") else None
    if extra and (listed is None or any(a.startswith("-") for a in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        setattr(args, listed, list(getattr(args, listed)) + extra)
    return run_guarded(args.run, args)
