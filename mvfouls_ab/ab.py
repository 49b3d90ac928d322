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
See mvfouls_ab/abtest.py for the design, the storage layout and the nested selection, mvfouls_ab/stats.py for the
statistics (the corrected resampled t-test for r x k-fold cells).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from . import abtest
from .cli import HelpFormatter
from .config import PROFILES
from .errors import MVFoulsError
from .orchestration import workers
from .orchestration.storage import DEFAULT_STORAGE


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
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
        return 2


def analyze_main(argv: list[str]) -> int:
    """`ab analyze`: verdicts for a CSV of cells (no torch, no storage, no MLflow)."""
    args = build_analyze_parser().parse_args(argv)
    try:
        frame, paths = analyze_file(args.cells, args.control, args.folds, args.alpha, args.out,
                                    power=args.power, report=not args.no_report)
    except MVFoulsError as exc:
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    print(abtest.format_verdicts(frame))
    print(f"\n[ab analyze] {stats_line(frame)}")
    print(f"[ab analyze] results: {', '.join(str(p) for p in paths.values())}")
    return 0


def stats_line(frame) -> str:
    if frame.empty:
        return "no comparison"
    r = frame.iloc[0]
    return (f"{r.test}; k = {int(r.folds)} folds, n = {int(frame.n.max())} paired cells; Holm over "
            f"{int((frame[frame.arm == r.arm].family == 'quality').sum())} quality metrics per arm")


def analyze_file(cells: Path | str, control: str, folds: int | None, alpha: float, out: Path | str,
                 power: float = 0.8, report: bool = True):
    """Read CELLS.csv, analyse it (abtest.analyze_cells, as the runner does) and write verdicts (and the report)."""
    table = abtest.load_cells(cells)
    frame = abtest.verdict_frame(abtest.analyze_cells(table, control, folds, alpha, power, source=cells))
    paths = abtest.write_verdicts(out, frame)
    if report:
        from .report import write_analysis_report

        paths["report"] = write_analysis_report(frame, table, Path(out) / "report.html", source=str(cells),
                                                alpha=alpha)
    return frame, paths


def _main(args: argparse.Namespace, argv: list[str]) -> int:
    from .tracking import DEFAULT_TRACKING_URI

    overrides = list(args.overrides)
    if args.data:
        overrides.append(f"data_root={args.data}")
    threads = args.threads or max(1, (os.cpu_count() or 1) // max(1, args.workers))
    overrides.append(f"threads={threads}")
    exp = abtest.load_experiment(args.experiment, args.seeds, args.folds, args.profile, overrides, args.epoch_scale)
    tracking_uri = None if args.no_mlflow else (args.tracking_uri or DEFAULT_TRACKING_URI)
    out = args.out or Path("runs") / "ab" / exp.name

    if args.workers > 1:
        # N independent workers on the same storage; each claims cells until none is waiting.
        worker_argv = [*_without(argv, ("--workers", "--threads")), "--worker-only", "--threads", str(threads)]
        abtest.CellStore(exp, args.storage).prepare()   # enqueue once, before the workers race
        if tracking_uri:
            from .tracking import init_store

            init_store(tracking_uri)                       # and create MLflow's tables once, too
        codes = workers.wait_all(workers.start_workers("mvfouls_ab.ab", [worker_argv] * args.workers))
        if any(codes):
            print(f"[ab] worker exit codes: {codes}", file=sys.stderr)
    else:
        summary = abtest.run_worker(exp, args.storage, tracking_uri, out, args.max_cells)
        if summary.failed:
            print(f"[ab] {len(summary.failed)} cells failed (rerun the same command to retry them):",
                  file=sys.stderr)
            for key, err in summary.failed.items():
                print(f"  {key}: {err}", file=sys.stderr)
        if args.worker_only:
            return 1 if summary.failed else 0
    return finish(exp, args.storage, tracking_uri, out, report=not args.no_report)


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


def finish(exp: abtest.Experiment, storage: str, tracking_uri: str | None, out: Path, report: bool = True) -> int:
    """Verdicts from whatever is finished; the report and MLflow logging once every cell is."""
    store = abtest.CellStore(exp, storage)
    counts = store.counts()
    finished = store.finished()
    table = abtest.results_table(exp, finished)
    frame = abtest.verdict_frame(abtest.analyze(exp, table))
    summary = abtest.arm_summary(exp, table)
    paths = abtest.write_results(exp, out, table, frame, summary)
    complete = counts["finished"] == counts["cells"]
    state = "complete" if complete else f"PARTIAL: {counts['finished']} of {counts['cells']} cells"
    print(f"\n[ab] {exp.study_name} ({state}); control = {exp.control}")
    print(summary.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print()
    print(abtest.format_verdicts(frame))
    print(f"\n[ab] {stats_line(frame)}")
    print(f"[ab] results: {', '.join(str(p) for p in paths.values())}")
    if not complete:
        print(f"[ab] {counts['running']} cells running elsewhere, {counts['waiting']} waiting; "
              "rerun the same command to continue (finished cells are not rerun)")
        return 0 if counts["running"] or counts["waiting"] else 1
    html = None
    if report:
        from .report import write_experiment_report

        html = write_experiment_report(exp.name, storage, out / "report.html", tracking_uri=tracking_uri)
        print(f"[ab] report: {html}")
    if tracking_uri:
        log_to_mlflow(store, tracking_uri, paths, frame, html)
    return 0


def log_to_mlflow(store: abtest.CellStore, tracking_uri: str, paths: dict[str, Path], frame, html: Path | None) -> None:
    """Verdict files and report on the parent run; per-arm verdict tags; parent and arm runs FINISHED."""
    from .tracking import make_client

    runs = abtest.ensure_parent_runs(store, tracking_uri)
    client = make_client(tracking_uri)
    parent = runs["_parent"]
    for path in paths.values():
        client.log_artifact(parent, str(path), "verdicts")
    if html is not None:
        client.log_artifact(parent, str(html))
    for arm in store.experiment.treatments:
        rows = frame[frame.arm == arm]
        primary = rows[rows.metric == abtest.PRIMARY_METRIC]
        if not primary.empty:
            r = primary.iloc[0]
            client.set_tag(runs[arm], "verdict", r.verdict)
            client.set_tag(parent, f"verdict.{arm}", r.verdict)
            client.log_metric(runs[arm], "ab/leaderboard_diff", float(r["diff"]))
            client.log_metric(runs[arm], "ab/leaderboard_p_adjusted", float(r.p_adjusted))
    for name, run_id in runs.items():
        if not name.startswith("_"):
            client.set_terminated(run_id, "FINISHED")
    client.set_terminated(parent, "FINISHED")


if __name__ == "__main__":
    sys.exit(main())
