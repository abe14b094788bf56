"""detr-irpe plot-logs / visualize curves: training curves of one or more runs in one PNG."""
from __future__ import annotations

from .. import pictures
from . import options


def add_arguments(p) -> None:
    p.add_argument("logs", nargs="+", help="runs: their log.jsonl files or their folders")
    p.add_argument("--out", required=True, help="PNG file to write")
    p.add_argument("--names", nargs="*", help="legend names (default: each run's folder name)")
    p.add_argument("--title")
    options.overwrite(p, "an existing --out file")


def run(args) -> int:
    print(pictures.plot_logs(args.logs, args.out, args.names, args.title, overwrite=args.overwrite))
    return 0
