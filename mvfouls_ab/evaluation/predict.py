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

import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import MVFoulsError, located
from ..fsutil import atomic_path
from ..modelpack import LOCAL_MODEL_DIR, ModelPackError

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
        from ..tracking import check_tracking_uri, normalize_db_url

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


@dataclass(frozen=True)
class PredictOptions:
    """What ``python -m mvfouls_ab.predict`` was asked (cli/predict.py)."""
    model: str                          # a model URI or a run folder
    data: str                           # the MVFouls root holding the split's folder
    split: str = "Test"
    out: str = "predictions.json"
    tracking_uri: str | None = None     # what a model URI resolves against (default: $MLFLOW_TRACKING_URI)
    cache_dir: str | None = None
    device: str = "auto"
    ignore_video_size: bool = False


def run(opts: PredictOptions) -> dict[str, Any]:
    """Predict the split, write the official prediction file (and the challenge zip for Chall); score it on a
    labelled split. Returns {"predictions", "actions", "metrics"?, "zip"?}."""
    from ..data.annotations import load_split
    from .official import detailed_report, write_predictions

    data = Path(opts.data).expanduser()
    if not data.is_dir():
        raise MVFoulsError(located(data, "data folder not found", "pass the MVFouls root (Train/ Valid/ Test/ Chall/)"))
    model = load_model(opts.model, opts.tracking_uri)     # before the data: a bad URI fails fast
    split = load_split(data, opts.split)
    params = {"split": opts.split, "data_root": str(data.resolve()), "cache_dir": opts.cache_dir or "",
              "device": opts.device, "check_video": not opts.ignore_video_size}
    frame = model.predict(model_input(split), params=params)
    out = Path(opts.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_predictions(out, list(frame["action_id"]), list(frame["action_index"]), list(frame["severity_index"]))
    result: dict[str, Any] = {"predictions": out, "actions": len(frame)}
    print(f"{opts.split}: {len(frame)} actions predicted -> {out}")
    if split.annotations_path is not None:
        report = detailed_report(split.annotations_path, out)
        m = report["metrics"]
        result["metrics"] = m
        print(f"{opts.split}: official leaderboard {m['leaderboard_value']:.2f} | BA action "
              f"{m['balanced_accuracy_action']:.2f} severity {m['balanced_accuracy_offence_severity']:.2f} | "
              f"accuracy action {m['accuracy_action']:.2f} severity {m['accuracy_offence_severity']:.2f}")
    if opts.split == "Chall":
        result["zip"] = write_submission_zip(out)
        print(f"challenge submission: {result['zip']} (upload it to the MV-Foul challenge's evaluation server)")
    return result
