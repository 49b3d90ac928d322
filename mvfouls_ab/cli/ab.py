"""python -m mvfouls_ab.ab --experiment experiments/ab_NAME.yaml [--seeds 5] [--folds 5] [--storage URL]
[--tracking-uri URI] [--out DIR] [--workers N] [--set key=value ...]
python -m mvfouls_ab.ab analyze --cells CELLS.csv --control NAME [--folds K] [--alpha A] --out DIR

Runs the experiment's arms x seeds x folds cells (resumable: finished cells are never rerun; several workers on the
same --storage share the cells), then prints the verdict table, writes cells.csv (long: arm,seed,fold,metric,value)
/ cells_wide.csv / verdicts.csv / verdicts.json / arms.csv / experiment.json and report.html under --out, and logs
them to the experiment's MLflow parent run.

`analyze` gives the same verdicts for cells produced anywhere (another framework, a spreadsheet): CELLS.csv is
long, with the header arm,seed,fold,metric,value (one row per cell and metric; blank = missing). A metric whose
name contains `loss` or ends in `_s` / `_mb` is lower-is-better, every other one higher-is-better; `system/...`
metrics are kept out of the Holm family of the others. K (the k of k-fold cross-validation, for the variance
correction) defaults to the number of distinct folds. It writes DIR/verdicts.json (a list of objects: arm, metric,
n, diff = B - A, ci_low, ci_high, p_value, p_adjusted, verdict, ...), DIR/verdicts.csv and DIR/report.html; it
imports no torch. A CSV it cannot analyse exits 2 with a message that names the file, what is wrong and the fix.
See mvfouls_ab/orchestration/ab.py for the design, the storage layout and the nested selection,
orchestration/stats.py for the statistics (the corrected resampled t-test for r x k-fold cells).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ..config import PROFILES
from ..errors import MVFoulsError
from ..orchestration import ab
from ..orchestration.storage import DEFAULT_STORAGE
from ..reporting.report import write_analysis_report, write_experiment_report
from ..tracking import DEFAULT_TRACKING_URI
from . import HelpFormatter, fail, script


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m mvfouls_ab.ab", description=__doc__.split("\n\n")[1],
                                 formatter_class=HelpFormatter,
                                 epilog="Verdicts for a CSV of cells from anywhere: python -m mvfouls_ab.ab analyze "
                                        "--help")
    ap.add_argument("--experiment", required=True, help="experiments/ab_NAME.yaml")
    ap.add_argument("--seeds", type=int, default=None, help="seeds per arm (default: the YAML's, else 5)")
    ap.add_argument("--folds", type=int, default=None, help="cross-validation folds (default: the YAML's, else 5)")
    ap.add_argument("--storage", default=DEFAULT_STORAGE,
                    help=f"Optuna RDB storage holding the cells (default {DEFAULT_STORAGE})")
    ap.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default sqlite:///mlflow.db)")
    ap.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    ap.add_argument("--out", type=Path, default=None, help="output folder (default runs/ab/NAME)")
    ap.add_argument("--profile", choices=sorted(PROFILES), default=None,
                    help="hardware profile, config.PROFILES (default: the YAML's)")
    ap.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                    help="override a TrainingConfig key of the shared base (all arms)")
    ap.add_argument("--epoch-scale", type=float, default=None,
                    help="multiply every arm's phase epochs (default: the YAML's epoch_scale; 1 = full recipes)")
    ap.add_argument("--data", default=None, help="data root (default: the cached synthetic data set)")
    ap.add_argument("--workers", type=int, default=1, help="worker processes on this machine (share --storage)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads per worker (0: cores / workers)")
    ap.add_argument("--max-cells", type=int, default=None, help="stop this worker after this many cells")
    ap.add_argument("--no-report", action="store_true", help="skip the HTML report")
    ap.add_argument("--worker-only", action="store_true", help=argparse.SUPPRESS)  # children of --workers N
    return ap


def build_analyze_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m mvfouls_ab.ab analyze", description=__doc__.split("\n\n")[2],
                                 formatter_class=HelpFormatter)
    ap.add_argument("--cells", required=True, type=Path, help="long CSV: arm,seed,fold,metric,value")
    ap.add_argument("--control", required=True, help="the control arm A (every other arm is a B)")
    ap.add_argument("--folds", type=int, default=None,
                    help="k of the k-fold cross-validation the cells come from (default: distinct folds in the CSV)")
    ap.add_argument("--alpha", type=float, default=0.05, help="family-wise error rate per comparison (default 0.05)")
    ap.add_argument("--power", type=float, default=0.8, help="power at which the MDE is stated (default 0.8)")
    ap.add_argument("--out", required=True, type=Path, help="output folder (verdicts.json, verdicts.csv, report.html)")
    ap.add_argument("--no-report", action="store_true", help="skip report.html")
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["analyze"]:
        return analyze_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return _main(args, argv)
    except MVFoulsError as exc:
        return fail(exc)


def analyze_main(argv: list[str]) -> int:
    """`ab analyze`: verdicts for a CSV of cells (no torch, no storage, no MLflow)."""
    args = build_analyze_parser().parse_args(argv)
    try:
        frame, paths = ab.analyze_file(args.cells, args.control, args.folds, args.alpha, args.out, power=args.power,
                                       report=None if args.no_report else write_analysis_report)
    except MVFoulsError as exc:
        return fail(exc)
    print(ab.format_verdicts(frame))
    print(f"\n[ab analyze] {ab.stats_line(frame)}")
    print(f"[ab analyze] results: {', '.join(str(p) for p in paths.values())}")
    return 0


def _main(args: argparse.Namespace, argv: list[str]) -> int:
    overrides = list(args.overrides)
    if args.data:
        overrides.append(f"data_root={args.data}")
    threads = args.threads or max(1, (os.cpu_count() or 1) // max(1, args.workers))
    overrides.append(f"threads={threads}")
    exp = ab.load_experiment(args.experiment, args.seeds, args.folds, args.profile, overrides, args.epoch_scale)
    opts = ab.RunOptions(storage=args.storage, out=args.out, workers=args.workers, threads=threads,
                         tracking_uri=None if args.no_mlflow else (args.tracking_uri or DEFAULT_TRACKING_URI),
                         max_cells=args.max_cells, worker_only=args.worker_only,
                         worker_argv=(*_without(argv, ("--workers", "--threads")), "--worker-only",
                                      "--threads", str(threads)))
    return ab.run(exp, opts, report=None if args.no_report else write_experiment_report)


def _without(argv: list[str], options: tuple[str, ...]) -> list[str]:
    """argv minus the given options and their values ("--opt V" and "--opt=V")."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in options:
            skip = True
        elif not a.startswith(tuple(f"{o}=" for o in options)):
            out.append(a)
    return out


if __name__ == "__main__":
    script(main)
