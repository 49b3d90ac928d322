"""``python -m mvfouls_ab.predict --model MODEL --data ROOT --split Test`` (= ``mvfouls-ab predict``): official
prediction files (and the challenge zip) from a logged model (evaluation/predict.py)."""
from __future__ import annotations

import argparse
import os

from ..errors import MVFoulsError
from ..evaluation import predict
from ..evaluation.predict import SPLITS, PredictOptions
from . import HelpFormatter, fail, script


def build_parser() -> argparse.ArgumentParser:
    doc = predict.__doc__
    p = argparse.ArgumentParser(prog="python -m mvfouls_ab.predict", description=doc.split("\n\n")[0],
                                epilog=doc.split("\n\n", 1)[1], formatter_class=HelpFormatter)
    p.add_argument("--model", required=True, help="models:/mvfouls-<study>@champion, another model URI, or a run folder")
    p.add_argument("--data", required=True, help="MVFouls root holding the split's folder")
    p.add_argument("--split", choices=SPLITS, default="Test", help="split to predict")
    p.add_argument("--out", default="predictions.json", help="official prediction file to write")
    p.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI") or None,
                   help="MLflow tracking URI the model URI resolves against (default: $MLFLOW_TRACKING_URI)")
    p.add_argument("--cache-dir", default=None,
                   help="decoded-clip and feature cache (default: $MVFOULS_AB_CACHE, else ~/.cache/mvfouls_ab)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="where the model runs")
    p.add_argument("--ignore-video-size", action="store_true",
                   help="predict even when the clips' frame size differs from the training data's")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        predict.run(PredictOptions(**vars(args)))
    except MVFoulsError as exc:
        return fail(exc)
    return 0


if __name__ == "__main__":
    script(main)
