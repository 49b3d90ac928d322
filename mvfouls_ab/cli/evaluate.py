"""``python -m mvfouls_ab.evaluate --annotations GT.json --predictions P.json [--json OUT]``: the official metric
(same numbers as the SoccerNet evaluator) with per-class recall, precision, F1 and confusion matrices."""
from __future__ import annotations

import argparse
from collections.abc import Sequence

from ..errors import MVFoulsError, located
from ..evaluation.official import detailed_report, format_report, write_json
from . import HelpFormatter, fail, script


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m mvfouls_ab.evaluate", formatter_class=HelpFormatter,
                                     description="Official SoccerNet MVFouls metric (same numbers as the SoccerNet "
                                     "evaluator) with per-class recall, precision, F1 and confusion matrices.")
    parser.add_argument("--annotations", required=True, help="ground-truth annotations.json of a split")
    parser.add_argument("--predictions", required=True, help="official prediction file")
    parser.add_argument("--json", default=None, help="also write the full report to this JSON file")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        report = detailed_report(args.annotations, args.predictions)
        print(format_report(report))
        if args.json:
            try:
                write_json(args.json, report)
            except OSError as exc:
                raise MVFoulsError(located(args.json, f"cannot write the report ({exc})",
                                           "choose a writable path")) from None
    except MVFoulsError as exc:
        return fail(exc)
    return 0


if __name__ == "__main__":
    script(main)
