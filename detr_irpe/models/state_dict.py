"""A state dict against the keys and shapes a model expects: what is missing, unexpected or misshapen.

One implementation for every reader of weights: loading a checkpoint into a model
(:mod:`detr_irpe.engine.checkpoint`) and reading or writing Hugging Face folders
(:mod:`detr_irpe.interop`). :func:`compare_state_dict` finds the differences and
:func:`describe` lists them, in the same words for every caller; each caller writes its own
headline and hints (what to type to fix it) around that list.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Mapping, Optional, Sequence, Tuple, Union

from torch import Tensor

LISTED = 20  # items shown per list in a message; the rest are counted

Shape = Tuple[int, ...]
Mismatch = Tuple[str, Shape, Shape]  # (key, the model's shape, the state dict's shape)
COUNTER = "num_batches_tracked"


@dataclass
class StateDictDiff:
    """How a state dict differs from a model's (all lists sorted; empty when it fits).

    Attributes:
        missing: the model's keys absent from the state dict.
        unexpected: the state dict's keys the model has no place for.
        mismatched: ``(key, model shape, state dict shape)`` for keys both have with other shapes.
    """

    missing: List[str] = field(default_factory=list)
    unexpected: List[str] = field(default_factory=list)
    mismatched: List[Mismatch] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.missing or self.unexpected or self.mismatched)


def compare_state_dict(expected: Mapping[str, Union[Tensor, Sequence[int]]],
                       state: Mapping[str, Tensor]) -> StateDictDiff:
    """Compare ``state`` with ``expected`` (a model's state dict, or key -> shape).

    A batch-norm ``num_batches_tracked`` counter next to an expected ``running_mean`` is not
    unexpected: frozen batch norm has no counter and loading drops it.
    """
    shapes = {k: tuple(v.shape) if isinstance(v, Tensor) else tuple(v) for k, v in expected.items()}
    missing = sorted(k for k in shapes if k not in state)
    unexpected = sorted(k for k in state if k not in shapes and not (
        k.endswith("." + COUNTER) and k[: -len(COUNTER)] + "running_mean" in shapes))
    mismatched = sorted((k, shapes[k], tuple(v.shape)) for k, v in state.items()
                        if k in shapes and tuple(v.shape) != shapes[k])
    return StateDictDiff(missing, unexpected, mismatched)


def listing(title: str, items: Sequence[str]) -> str:
    """``"\\n  title (n):\\n    item\\n    item ..."``, at most :data:`LISTED` items, the rest counted."""
    more = f"\n    ... and {len(items) - LISTED} more" if len(items) > LISTED else ""
    return f"\n  {title} ({len(items)}):\n    " + "\n    ".join(items[:LISTED]) + more


def describe(diff: StateDictDiff, origin: Optional[Mapping[str, str]] = None) -> str:
    """The lists of ``diff`` as message lines (empty lists left out), to follow a headline.

    ``origin`` maps a key of the state dict to where it was read from (e.g. the transformers
    key it was renamed from), quoted after unexpected and misshapen keys as ``key (from ...)``.
    """
    origin = origin or {}
    named = lambda key: f"{key} (from {origin[key]})" if key in origin else key  # noqa: E731

    text = ""
    for title, items in (
            ("missing from the checkpoint", diff.missing),
            ("unexpected in the checkpoint (not in the model)", [named(k) for k in diff.unexpected]),
            ("shape mismatches", [f"{named(k)}: model expects {list(m)}, checkpoint has {list(c)}"
                                  for k, m, c in diff.mismatched])):
        if items:
            text += listing(title, items)
    return text
