"""Arguments several subcommands share, spelled the same way in each."""
from __future__ import annotations

import argparse
import os
import re
from typing import List, Sequence, Tuple

OVERRIDE_HELP = "config overrides such as train.lr=2e-4 model.rpe=null (values are YAML)"
_KEY = re.compile(r"^-*[A-Za-z_]\w*(\.[A-Za-z_]\w*)?=")


def overrides(parser: argparse.ArgumentParser) -> None:
    """Positional ``KEY=VALUE`` config overrides (every command that has a config takes them so)."""
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=OVERRIDE_HELP)


def inputs_and_overrides(parser: argparse.ArgumentParser, inputs: str) -> None:
    """One positional list for a command that takes files too: ``photos/ a.jpg train.lr=1e-4``."""
    parser.add_argument("items", nargs="*", metavar="FILE|KEY=VALUE",
                        help=f"{inputs}, and {OVERRIDE_HELP}")


def is_override(item: str) -> bool:
    """``section.key=value`` or ``key=value``, unless a file of that name exists."""
    return bool(_KEY.match(item)) and not os.path.exists(item)


def split_items(items: Sequence[str]) -> Tuple[List[str], List[str]]:
    """``(files, overrides)`` of :func:`inputs_and_overrides`' list."""
    return [i for i in items if not is_override(i)], [i for i in items if is_override(i)]


def overwrite(parser: argparse.ArgumentParser, what: str = "files of an earlier run") -> None:
    parser.add_argument("--overwrite", action="store_true",
                        help=f"replace {what} (never this command's inputs); without it nothing is replaced")


def device(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default %(default)s)")


def checkpoint(parser: argparse.ArgumentParser) -> None:
    """``--checkpoint`` (required), ``--config`` and ``--device``: a model from a checkpoint."""
    parser.add_argument("--checkpoint", required=True,
                        help="checkpoint: .pth or .safetensors file, Hugging Face folder or hub id, http(s) URL")
    parser.add_argument("--config", help="YAML config (a path or a shipped name); default: the checkpoint's")
    device(parser)


def batched_backbone(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batched-backbone", action="store_true",
                        help="run the CNN on padded batches, as training does (faster on a GPU; an image's "
                             "detections then depend on what it is batched with)")
