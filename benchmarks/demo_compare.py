"""The demo recipe with the iRPE encoder and with the plain encoder, side by side.

Both runs use the same synthetic data, seed, config and time budget (``model.rpe=null`` is the
only difference), one after the other, so the whole comparison takes twice the budget.

    python benchmarks/demo_compare.py                      # 2 x 15 minutes
    python benchmarks/demo_compare.py --budget-minutes 5   # 2 x 5 minutes
    python benchmarks/demo_compare.py --json outputs/demo_compare/compare.json train.seed=1

Prints AP / AP50 / AP75, training iterations and seconds of both runs and writes them (with the
machine, the load average and the command) to a JSON file.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from detr_irpe.apps.demo import DemoSettings, run_compare


def machine() -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    if hasattr(os, "getloadavg"):
        info["load_average_at_start"] = os.getloadavg()
    return info


def main(argv=None):
    d = DemoSettings()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget-minutes", type=float, default=d.budget_minutes,
                        help="budget of each of the two runs (default %(default)s)")
    parser.add_argument("--output-dir", default="outputs/demo_compare", help="runs go to <dir>/irpe and <dir>/plain")
    parser.add_argument("--data-root", default=d.data_root)
    parser.add_argument("--config", help="YAML config (default: configs/demo.yaml)")
    parser.add_argument("--json", help="result file (default: <output-dir>/compare.json)")
    parser.add_argument("--no-pictures", action="store_true", help="skip the pictures of both runs")
    parser.add_argument("overrides", nargs="*", help="key=value overrides applied to both runs")
    args = parser.parse_args(argv)

    settings = DemoSettings(config=args.config, overrides=list(args.overrides), output_dir=args.output_dir,
                            data_root=args.data_root, budget_minutes=args.budget_minutes,
                            pictures=not args.no_pictures)
    info = machine()
    start = time.time()
    results = run_compare(settings)
    if hasattr(os, "getloadavg"):
        info["load_average_at_end"] = os.getloadavg()

    rows = {name: {"rpe": r["rpe"], "AP": r["AP"], "AP50": r["AP50"], "AP75": r["AP75"],
                   "iterations": r["iterations"], "training_seconds": round(r["seconds"]["training"], 1),
                   "total_seconds": round(r["seconds"]["total"], 1), "device": r["device"]}
            for name, r in results.items()}
    print(f"\n{'encoder':<34} {'AP':>6} {'AP50':>6} {'AP75':>6} {'iters':>7} {'train s':>8}")
    for name, r in rows.items():
        label = f"{name} ({r['rpe'] or 'no iRPE'})"
        print(f"{label:<34} {r['AP']:>6.3f} {r['AP50']:>6.3f} {r['AP75']:>6.3f} {r['iterations']:>7d} "
              f"{r['training_seconds']:>8.0f}")
    out = Path(args.json or Path(args.output_dir) / "compare.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
                               "budget_minutes": args.budget_minutes, "seconds": round(time.time() - start, 1),
                               "machine": info, "results": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
