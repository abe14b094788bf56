"""Stopping a training run on a signal at an iteration boundary, the same iteration on every process."""
from __future__ import annotations

import signal
from typing import Optional

from tqdm import tqdm

from . import distributed as du


class StopRequest:
    """Turns SIGTERM / SIGINT into a flag checked at iteration boundaries (preemption-safe)."""

    def __init__(self):
        self.requested = False
        self.signum: Optional[int] = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not in the main thread
                pass
        return self

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self.requested = True
        self.signum = signum
        if du.is_main_process():
            tqdm.write(f"received {signal.Signals(signum).name}: saving a checkpoint at the next iteration boundary")

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False

    def agreed(self, device) -> bool:
        """True if any process was asked to stop (so all ranks stop at the same iteration)."""
        return du.any_process(self.requested, device)

    @property
    def signal_number(self) -> int:
        """The signal that asked for the stop (SIGTERM when it came from another rank)."""
        return self.signum if self.signum is not None else int(signal.SIGTERM)
