"""The package's documented errors. Each message says what is wrong and what to do about it.

Every one derives from :class:`DetrIrpeError` and from the builtin a caller would expect
(``ValueError``, ``FileNotFoundError``, ``RuntimeError``, ...), so ``except ValueError`` keeps
working. The command-line tools print a ``DetrIrpeError`` as one ``error: <message>`` line
(:func:`detr_irpe.apps.cli.main`); anything else is a bug and keeps its traceback.
"""
from __future__ import annotations


class DetrIrpeError(Exception):
    """Root of the errors whose message is meant for the user."""


class UsageError(DetrIrpeError, ValueError):
    """An argument or option has a value that cannot work (a command-line flag, a function argument)."""


class InputNotFoundError(DetrIrpeError, FileNotFoundError):
    """A file or folder named by the user does not exist."""


class CheckpointError(DetrIrpeError, RuntimeError):
    """A checkpoint or weights file cannot be read or downloaded, or does not fit the model."""


class CheckpointNotFoundError(DetrIrpeError, FileNotFoundError):
    """No checkpoint or weights file at the given path."""


class TrainingStopped(DetrIrpeError):
    """Training stopped on a signal (SIGTERM, Ctrl-C) after saving a checkpoint; the run is not done.

    ``exit_code`` is what a shell reports for a process killed by that signal (128 + its number),
    so that ``train && eval`` and job schedulers see an unfinished run.
    """

    def __init__(self, message: str, signum: int, checkpoint):
        super().__init__(message)
        self.signum, self.checkpoint = signum, checkpoint

    @property
    def exit_code(self) -> int:
        return 128 + self.signum
