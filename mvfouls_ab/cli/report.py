"""``python -m mvfouls_ab.report --experiment NAME | --study NAME`` (= ``mvfouls-ab report``): one self-contained
HTML report of an A/B experiment or a study (reporting/report.py)."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import MVFoulsError
from ..orchestration.storage import DEFAULT_STORAGE
from ..reporting import report
from ..tracking import DEFAULT_TRACKING_URI
from . import HelpFormatter, fail, script


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mvfouls_ab.report", description=report.__doc__.split("\n\n")[0],
                                 formatter_class=HelpFormatter)
    which = ap.add_mutually_exclusive_group(required=True)
    which.add_argument("--experiment", help="A/B experiment name (or its experiments/ab_NAME.yaml)")
    which.add_argument("--study", help="Optuna HPO study name")
    ap.add_argument("--storage", default=DEFAULT_STORAGE)
    ap.add_argument("--tracking-uri", default=None, help="log the report to MLflow (default sqlite:///mlflow.db)")
    ap.add_argument("--no-mlflow", action="store_true")
    ap.add_argument("--out", type=Path, default=None, help="HTML file (default runs/reports/NAME.html)")
    args = ap.parse_args(argv)

    tracking = None if args.no_mlflow else (args.tracking_uri or DEFAULT_TRACKING_URI)
    try:
        if args.experiment:
            name = Path(args.experiment).stem.removeprefix("ab_") if args.experiment.endswith(".yaml") \
                else args.experiment
            path = report.write_experiment_report(args.experiment, args.storage,
                                           args.out or Path("runs") / "reports" / f"ab_{name}.html", tracking)
        else:
            path = report.write_study_report(args.study, args.storage,
                                      args.out or Path("runs") / "reports" / f"study_{args.study}.html", tracking)
    except MVFoulsError as exc:
        return fail(exc)
    print(f"report: {path}")
    return 0


if __name__ == "__main__":
    script(main)
