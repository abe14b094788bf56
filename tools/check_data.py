#!/usr/bin/env python
"""Check a COCO-format dataset before training: every problem, grouped, with counts and examples.

    python tools/check_data.py --annotations data/coco/annotations/instances_val2017.json --images data/coco/val2017
    python tools/check_data.py --config configs/detr_r50.yaml --split both data.root=/data/coco
    python tools/check_data.py --config configs/detr_r50.yaml --split train --no-images   # json + file existence

Exit code 0 when there are no errors (warnings are problems the loader tolerates; --strict
counts them too), 1 otherwise.
"""
import sys

from detr_irpe.apps.cli import main as cli_main


def main(argv=None) -> int:
    """``detr-irpe check-data`` with ``argv`` (default: the command line)."""
    return cli_main(argv, command="check-data")


if __name__ == "__main__":
    sys.exit(main())
