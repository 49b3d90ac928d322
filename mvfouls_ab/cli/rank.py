"""Rank a study's trials: python -m mvfouls_ab.rank --study NAME [--storage URL] [--out DIR] [--no-mlflow]

Prints the leaderboard (targets-met first, then the official Valid leaderboard value), re-scores the best trial on
Test from its official prediction file, writes leaderboard.csv and best_trial_test.json to --out (default: the
study's own output folder) and logs both to the study's MLflow parent run unless --no-mlflow.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import MVFoulsError, StudyError, located
from ..orchestration import ranking
from ..orchestration.storage import DEFAULT_STORAGE, open_storage
from . import HelpFormatter, fail, script


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mvfouls_ab.rank", description=__doc__.splitlines()[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--study", required=True, help="Optuna study name")
    p.add_argument("--storage", default=DEFAULT_STORAGE)
    p.add_argument("--out", default=None, help="folder for leaderboard.csv (default: the study's output folder)")
    p.add_argument("--top", type=int, default=20, help="rows to print")
    p.add_argument("--no-mlflow", action="store_true", help="do not log the ranking to the MLflow parent run")
    args = p.parse_args(argv)
    try:
        import optuna

        storage = open_storage(args.storage)
        try:
            study = optuna.load_study(study_name=args.study, storage=storage)
        except KeyError:
            names = ", ".join(s.study_name for s in optuna.get_all_study_summaries(storage)) or "none"
            raise StudyError(located(args.storage, f"no study named {args.study!r}",
                                     f"pass one of: {names}")) from None
        out = Path(args.out or study.user_attrs.get("out") or Path("runs") / "studies" / args.study)
        tracker = None
        run_id, uri = study.user_attrs.get("mlflow_parent_run_id"), study.user_attrs.get("mlflow_tracking_uri")
        if run_id and uri and not args.no_mlflow:
            from ..tracking import RunTracker

            tracker = RunTracker(uri, args.study, "", resume_run_id=run_id)
        saved = ranking.save_ranking(study, out, tracker)
        if tracker is not None:
            tracker.end("FINISHED", flush_timeout=60)
    except MVFoulsError as exc:
        return fail(exc)
    print(ranking.format_leaderboard(saved["frame"], top=args.top))
    print(ranking.format_test(saved["test"]))
    print(f"leaderboard CSV: {saved['csv']}")
    return 0


if __name__ == "__main__":
    script(main)
