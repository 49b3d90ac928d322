"""``python -m mvfouls_ab.tracking replay SPILL --tracking-uri URI``: send the MLflow operations a run could not send
(its ``mlflow_spill.jsonl``; tracking/logger.py)."""
from __future__ import annotations

import argparse
from collections.abc import Iterable
from pathlib import Path

from ..errors import MVFoulsError, StudyError, located
from ..tracking import DEFAULT_TRACKING_URI, SPILL_NAME, replay_spill
from . import HelpFormatter, fail, script


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m mvfouls_ab.tracking", formatter_class=HelpFormatter,
                                 description="Replay MLflow operations a run could not send.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    rp = sub.add_parser("replay", help="send a run folder's mlflow_spill.jsonl", formatter_class=HelpFormatter)
    rp.add_argument("spill", type=Path)
    rp.add_argument("--tracking-uri", default=DEFAULT_TRACKING_URI)
    return ap


def main(argv: Iterable[str] | None = None) -> int:
    args = build_parser().parse_args(list(argv) if argv is not None else None)
    try:
        if not args.spill.is_file():
            raise StudyError(located(args.spill, "spill file not found", f"pass <run_dir>/{SPILL_NAME}"))
        n = replay_spill(args.spill, args.tracking_uri)
    except MVFoulsError as exc:
        return fail(exc)
    print(f"replayed {n} operations to {args.tracking_uri}")
    return 0


if __name__ == "__main__":
    script(main)
