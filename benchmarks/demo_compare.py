"""The demo with the iRPE encoder and with the plain encoder, over several seeds.

Every run is the demo's fixed schedule (``configs/demo.yaml``) on the same synthetic data;
``model.rpe=null`` is the only difference between the two encoders, and ``train.seed`` between
the runs of one encoder. Runs go one after the other.

    python benchmarks/demo_compare.py                          # seeds 0 1 2, both encoders: 6 runs
    python benchmarks/demo_compare.py --seeds 0 --no-pictures  # one of each
    python benchmarks/demo_compare.py --json outputs/demo_compare/compare.json train.lr=3e-4

Prints AP / AP50 / AP75 of every run and, per encoder, their mean and spread (min-max), and
writes them with the machine and the command to a JSON file.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from detr_irpe.apps.demo import DemoSettings, run_demo
from machine import describe

VARIANTS = (("irpe", []), ("plain", ["model.rpe=null"]))
METRICS = ("AP", "AP50", "AP75")


def main(argv=None):
    d = DemoSettings()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="train.seed of the runs")
    parser.add_argument("--output-dir", default="outputs/demo_compare", help="runs go to <dir>/<encoder>_seed<N>")
    parser.add_argument("--data-root", default=d.data_root)
    parser.add_argument("--config", help="YAML config (default: the shipped demo.yaml)")
    parser.add_argument("--json", help="result file (default: <output-dir>/compare.json)")
    parser.add_argument("--no-pictures", action="store_true", help="skip the pictures of every run")
    parser.add_argument("overrides", nargs="*", help="key=value overrides applied to every run")
    args = parser.parse_args(argv)

    start, machine = time.time(), describe()
    rows = []
    for seed in args.seeds:
        for name, extra in VARIANTS:
            settings = DemoSettings(config=args.config, output_dir=str(Path(args.output_dir) / f"{name}_seed{seed}"),
                                    data_root=args.data_root, pictures=not args.no_pictures, quiet=True,
                                    overrides=list(args.overrides) + extra + [f"train.seed={seed}"])
            r = run_demo(settings)
            rows.append({"encoder": name, "rpe": r["rpe"], "seed": seed, **{m: r[m] for m in METRICS},
                         "iterations": r["iterations"], "pretrain_iterations": r["pretrain_iterations"],
                         "seconds": round(r["seconds"]["total"], 1)})
            print(f"{name:6s} seed {seed}: " + "  ".join(f"{m} {r[m]:.3f}" for m in METRICS)
                  + f"  ({r['iterations']} iterations, {r['seconds']['total'] / 60:.1f} min)", flush=True)
    summary = {}
    print(f"\n{'encoder':<8}" + "".join(f"{m:>22}" for m in METRICS))
    for name, _ in VARIANTS:
        runs = [r for r in rows if r["encoder"] == name]
        summary[name] = {m: {"mean": statistics.mean(r[m] for r in runs), "min": min(r[m] for r in runs),
                             "max": max(r[m] for r in runs)} for m in METRICS}
        print(f"{name:<8}" + "".join(f"{s['mean']:>8.3f} ({s['min']:.3f}-{s['max']:.3f})"
                                     for s in summary[name].values()))
    out = Path(args.json or Path(args.output_dir) / "compare.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]), "machine": machine,
                               "seconds": round(time.time() - start, 1), "runs": rows, "summary": summary},
                              indent=2))
    print(f"wrote {out}")
    return {"runs": rows, "summary": summary}


if __name__ == "__main__":
    main()
