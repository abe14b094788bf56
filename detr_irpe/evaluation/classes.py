"""Whether a model's classes are the categories of the annotations it is evaluated on.

A model predicts category ids ``0 .. num_classes - 1``; COCO evaluation matches them with the
annotation file's ``category_id``s. When the two do not describe the same things (a 3-class model
on COCO's 80 categories, or ids that name other classes), every AP is a number that measures
nothing, and pycocotools prints it without a word.
"""
from __future__ import annotations

from typing import Mapping, Optional

from ..errors import DetrIrpeError

_SHOWN = 3  # examples per kind of disagreement


class ClassMismatchError(DetrIrpeError, ValueError):
    """The model's classes and the annotations' categories do not match (raised with ``--strict``)."""


class ClassMismatchWarning(UserWarning):
    """The model's classes and the annotations' categories do not match: the AP means little."""


def _ids(ids) -> str:
    ids = sorted(ids)
    return ", ".join(map(str, ids)) if len(ids) <= 6 else f"{ids[0]}..{ids[-1]}"


def _same_name(a: str, b: str) -> bool:
    return a.strip().lower() == b.strip().lower()


def class_mismatch(model_names: Mapping[int, str], num_classes: int,
                   dataset_names: Mapping[int, str]) -> Optional[str]:
    """What makes the model's classes and the annotations' categories disagree, or None.

    Args:
        model_names: the model's ``{category id: name}`` (empty when the checkpoint stores none,
            as official DETR's: then only the ids are compared).
        num_classes: the model predicts category ids ``0 .. num_classes - 1``.
        dataset_names: the annotation file's ``{category id: name}``.
    """
    dataset_ids = sorted(dataset_names)
    if not dataset_ids:
        return None
    reachable = [c for c in dataset_ids if c < num_classes]
    if not reachable:
        return (f"none of the annotations' {len(dataset_ids)} categories (ids {_ids(dataset_ids)}) is a class "
                f"of the model, which predicts ids 0..{num_classes - 1}: every AP is 0 whatever it detects")
    problems = []
    named = [c for c in reachable if c in model_names]
    renamed = [c for c in named if not _same_name(model_names[c], dataset_names[c])]
    if renamed:
        shown = "; ".join(f"id {c} is '{model_names[c]}' for the model, '{dataset_names[c]}' in the annotations"
                          for c in renamed[:_SHOWN])
        more = f"; and {len(renamed) - _SHOWN} more" if len(renamed) > _SHOWN else ""
        scope = "every" if len(renamed) == len(named) else f"{len(renamed)} of the {len(named)}"
        problems.append(f"{scope} category id the two share names another class ({shown}{more})")
    unreachable = [c for c in dataset_ids if c >= num_classes]
    if unreachable:
        problems.append(f"{len(unreachable)} of the annotations' categories (ids {_ids(unreachable)}) are beyond "
                        f"the model's classes (ids 0..{num_classes - 1}), so their AP is 0")
    return "; ".join(problems) or None
