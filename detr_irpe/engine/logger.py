"""Training logs: smoothed meters for the progress bar and one JSON object per line in ``log.jsonl``."""
from __future__ import annotations

import json
import math
from collections import defaultdict, deque
from pathlib import Path
from typing import Dict, Optional

from ..files import append_line, make_folder


class SmoothedValue:
    """Running median/average over a window plus the global average."""

    def __init__(self, window: int = 20):
        self.values = deque(maxlen=window)
        self.total = 0.0
        self.count = 0

    def update(self, value: float, n: int = 1) -> None:
        self.values.append(value)
        self.total += value * n
        self.count += n

    @property
    def avg(self) -> float:
        return sum(self.values) / max(len(self.values), 1)

    @property
    def global_avg(self) -> float:
        return self.total / max(self.count, 1)


class MetricLogger:
    """A set of named :class:`SmoothedValue` meters."""

    def __init__(self, window: int = 20):
        self.meters: Dict[str, SmoothedValue] = defaultdict(lambda: SmoothedValue(window))

    def update(self, **values: float) -> None:
        for name, value in values.items():
            if value is None:
                continue
            value = float(value)
            if math.isfinite(value):
                self.meters[name].update(value)

    def averages(self) -> Dict[str, float]:
        return {name: meter.global_avg for name, meter in self.meters.items()}

    def recent(self, *names: str) -> Dict[str, float]:
        return {n: self.meters[n].avg for n in names if n in self.meters}


class JsonlWriter:
    """Appends one JSON object per line to ``path`` (only on the main process: pass ``enabled``)."""

    def __init__(self, path: Optional[Path], enabled: bool = True):
        self.path = Path(path) if path is not None else None
        self.enabled = enabled and self.path is not None
        if self.enabled:
            make_folder(self.path.parent)

    def write(self, record: dict) -> None:
        if self.enabled:
            append_line(self.path, json.dumps(record, default=float))


def read_jsonl(path) -> list:
    """Records of a ``log.jsonl`` (lines that fail to parse, e.g. a torn last line, are skipped)."""
    records = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records
