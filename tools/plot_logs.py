#!/usr/bin/env python
"""Training curves (losses, class error, AP / AP50 over epochs) of one or more runs in one PNG.

    python tools/plot_logs.py outputs/run_a/log.jsonl outputs/run_b/log.jsonl --out curves.png
"""
import sys

from detr_irpe.apps.cli import main as cli_main


def main(argv=None) -> int:
    """``detr-irpe plot-logs`` with ``argv`` (default: the command line)."""
    return cli_main(argv, command="plot-logs")


if __name__ == "__main__":
    sys.exit(main())
