#!/usr/bin/env python
"""Training curves (losses, class error, AP / AP50 over epochs) of one or more runs in one PNG.

    python tools/plot_logs.py outputs/run_a/log.jsonl outputs/run_b/log.jsonl --out curves.png
"""
import argparse
import sys


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("logs", nargs="+", help="log.jsonl files, one per run")
    parser.add_argument("--out", required=True, help="PNG file to write")
    parser.add_argument("--names", nargs="*", help="legend names (default: each log's folder name)")
    parser.add_argument("--title")
    args = parser.parse_args(argv)
    from detr_irpe.visualize.commands import plot_logs

    try:
        print(plot_logs(args.logs, args.out, args.names, args.title))
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
