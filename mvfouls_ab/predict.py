"""Predict a split with a logged model: ``python -m mvfouls_ab.predict --model MODEL --data ROOT --split Test``.

MODEL is an MLflow model URI (``models:/mvfouls-<study>@champion``, ``models:/<name>/<version>``, ``runs:/<run id>/
model``, ``models:/<model id>``) or a run folder (a trial's ``runs/studies/<study>/trial_NNNN`` or a train run's
folder, which hold the model as ``mlflow_model/``). The model is loaded with ``mlflow.pyfunc.load_model`` and
predicts from the split's clips (decode, backbone, standardize, heads, post-hoc adjustment: see modelpack.py).

Writes the official prediction file (``--out``); on a labelled split (Test, Valid) prints the official metric of it.
For Chall it also writes the zip the challenge server takes (``--out`` with ``.zip``: the JSON at the zip's root).
On Test, the champion's file is the study's ``best_trial_NNNN_predictions_test.json``, action for action.
Model URIs resolve against ``--tracking-uri`` (default: ``$MLFLOW_TRACKING_URI``, as in every MLflow client).
Errors a user can cause (unknown model, data without the split, a model that does not match the data) print one
line and exit 2.
"""
from __future__ import annotations

import argparse
import os
import sys
import zipfile
from pathlib import Path
from typing import Any

from .errors import MVFoulsError, located
from .fsutil import atomic_path
from .modelpack import LOCAL_MODEL_DIR, ModelPackError

SPLITS = ("Test", "Chall", "Valid", "Train")


def resolve_model(model: str) -> str:
    """A local model folder (a run folder or an MLflow model folder) as a path; anything else as a URI."""
    path = Path(model).expanduser()
    if path.is_dir():
        for candidate in (path, path / LOCAL_MODEL_DIR):
            if (candidate / "MLmodel").is_file():
                return str(candidate.resolve())
        raise ModelPackError(located(path, "no MLflow model in this folder (no MLmodel, no mlflow_model/)",
                                     "pass a trial's or train run's folder, or a model URI like "
                                     "models:/mvfouls-<study>@champion"))
    if "://" not in model and ":/" not in model:
        raise ModelPackError(located(model, "neither a folder nor a model URI",
                                     "pass a run folder or models:/NAME@champion, models:/NAME/VERSION, "
                                     "runs:/RUN_ID/model"))
    return model


def load_model(model: str, tracking_uri: str | None = None) -> Any:
    """mlflow.pyfunc.load_model with our errors: an unknown model or store is one clear line."""
    import mlflow
    import mlflow.pyfunc
    from mlflow.exceptions import MlflowException

    uri = resolve_model(model)
    if tracking_uri:
        from .tracking import check_tracking_uri, normalize_db_url

        mlflow.set_tracking_uri(normalize_db_url(check_tracking_uri(tracking_uri)))
        mlflow.set_registry_uri(normalize_db_url(tracking_uri))
    where = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or mlflow.get_tracking_uri()
    try:
        return mlflow.pyfunc.load_model(uri)
    except MlflowException as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelPackError(located(uri, f"cannot load the model from {where} ({first[:300]})",
                                     "check the name/version/alias (the study prints its champion's URI) and "
                                     "--tracking-uri (or MLFLOW_TRACKING_URI)")) from None
    except OSError as exc:
        raise ModelPackError(located(uri, f"cannot read the model ({type(exc).__name__}: {exc})",
                                     "check the path and the tracking store's artifacts")) from None


def model_input(split: Any):
    """The pyfunc's input for a loaded split: one row per kept action, its clips' absolute paths in view order."""
    import pandas as pd

    return pd.DataFrame({"action_id": [a.action_id for a in split.actions],
                         "clips": [[str(c.path) for c in a.clips] for a in split.actions]})


def write_submission_zip(predictions: Path, zip_path: Path | None = None) -> Path:
    """The zip the challenge server takes: the prediction JSON alone, at the zip's root."""
    zip_path = zip_path or predictions.with_suffix(".zip")
    with atomic_path(zip_path) as tmp, zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.write(predictions, arcname=predictions.name)
    return zip_path


def run(args: argparse.Namespace) -> dict[str, Any]:
    from .data.annotations import load_split
    from .evaluate import detailed_report, write_predictions

    data = Path(args.data).expanduser()
    if not data.is_dir():
        raise MVFoulsError(located(data, "data folder not found", "pass the MVFouls root (Train/ Valid/ Test/ Chall/)"))
    model = load_model(args.model, args.tracking_uri)     # before the data: a bad URI fails fast
    split = load_split(data, args.split)
    params = {"split": args.split, "data_root": str(data.resolve()), "cache_dir": args.cache_dir or "",
              "device": args.device, "check_video": not args.ignore_video_size}
    frame = model.predict(model_input(split), params=params)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_predictions(out, list(frame["action_id"]), list(frame["action_index"]), list(frame["severity_index"]))
    result: dict[str, Any] = {"predictions": out, "actions": len(frame)}
    print(f"{args.split}: {len(frame)} actions predicted -> {out}")
    if split.annotations_path is not None:
        report = detailed_report(split.annotations_path, out)
        m = report["metrics"]
        result["metrics"] = m
        print(f"{args.split}: official leaderboard {m['leaderboard_value']:.2f} | BA action "
              f"{m['balanced_accuracy_action']:.2f} severity {m['balanced_accuracy_offence_severity']:.2f} | "
              f"accuracy action {m['accuracy_action']:.2f} severity {m['accuracy_offence_severity']:.2f}")
    if args.split == "Chall":
        result["zip"] = write_submission_zip(out)
        print(f"challenge submission: {result['zip']} (upload it to the MV-Foul challenge's evaluation server)")
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from .cli import HelpFormatter

    p = argparse.ArgumentParser(prog="python -m mvfouls_ab.predict", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1], formatter_class=HelpFormatter)
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
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except MVFoulsError as exc:
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
