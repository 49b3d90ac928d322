"""The official SoccerNet MVFouls metric, a per-class report, and the official prediction-file writer.

``official_metrics`` returns the same five numbers (same keys, percent) as
``SoccerNet.Evaluation.MV_FoulRecognition.evaluate``, quirks included:

- the ground truth is filtered and labelled by ``labels.official_label`` (the evaluator's four rules);
- a prediction's Offence is compared with the *raw* ground-truth string, so a "No Offence" ground truth or a Dive
  whose raw Offence is "" / "Between" is only matched by that exact string; the Severity is compared with the
  evaluator's normalized string (a kept Dive always expects "1.0", whatever its class);
- a kept action missing from the prediction file counts as wrong (we also warn, once, listing the ids);
- a class without ground truth makes its balanced accuracy NaN (0/0), and no kept action makes everything NaN.

The SoccerNet package is the test oracle only; nothing here imports it.

The command: cli/evaluate.py (``python -m mvfouls_ab.evaluate --annotations GT.json --predictions P.json``).
"""
from __future__ import annotations

import json
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

from .. import labels
from ..errors import AnnotationError, located
from ..fsutil import atomic_write, jsonable

METRIC_KEYS: tuple[str, ...] = (
    "accuracy_offence_severity", "accuracy_action",
    "balanced_accuracy_offence_severity", "balanced_accuracy_action", "leaderboard_value",
)
ENTRY_FIELDS: tuple[str, ...] = ("Action class", "Offence", "Severity")
# Confusion-matrix column for a kept action that no class of ours explains: missing from the prediction file,
# strings we do not write, or the right class index with strings the official evaluator scores wrong.
UNSCORED = "missing/unmatched"


@dataclass(frozen=True)
class ScoredActions:
    """Every kept ground-truth action, scored exactly as the official evaluator scores it."""

    action_ids: list[str]
    truth: dict[str, np.ndarray]      # task -> int64 [N] official class
    correct: dict[str, np.ndarray]    # task -> bool [N] the evaluator's string comparison
    predicted: dict[str, np.ndarray]  # task -> int64 [N]: truth where correct, else decoded class, -1 if none
    missing: list[str]                # kept ids absent from the prediction file
    dropped: dict[str, int]           # filter rule -> number of ground-truth actions it dropped


def load_actions(path: Path | str, kind: str) -> dict[str, dict]:
    """Read the "Actions" object of an annotations or prediction file; AnnotationError on anything malformed."""
    path = Path(path)
    fix = ("pass the annotations.json of a split (Train/Valid/Test)" if kind == "annotations"
           else 'write it with mvfouls_ab.evaluate.write_predictions ({"Actions": {"<id>": {...}}})')
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise AnnotationError(located(path, f"cannot read the {kind} file ({type(exc).__name__}: {exc})", fix)) from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise AnnotationError(located(
            path, f"{kind} file is not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})",
            "repair the JSON syntax or re-create the file")) from exc
    if not isinstance(data, dict) or "Actions" not in data:
        raise AnnotationError(located(path, f'{kind} file has no top-level "Actions" object', fix))
    actions = data["Actions"]
    if not isinstance(actions, dict):
        raise AnnotationError(located(
            path, f'"Actions" is a {type(actions).__name__}, not an object mapping action ids to entries', fix))
    for action_id, entry in actions.items():
        if not isinstance(entry, dict):
            raise AnnotationError(located(
                path, f"entry is a {type(entry).__name__}, not an object", fix, action_id=action_id))
        absent = [field for field in ENTRY_FIELDS if field not in entry]
        if absent:
            raise AnnotationError(located(
                path, f"entry lacks {', '.join(repr(f) for f in absent)}",
                f"give every entry the fields {', '.join(repr(f) for f in ENTRY_FIELDS)}", action_id=action_id))
        if kind == "annotations":
            wrong = [field for field in ENTRY_FIELDS if not isinstance(entry[field], str)]
            if wrong:
                raise AnnotationError(located(
                    path, f"{', '.join(repr(f) for f in wrong)} must be strings", 'write them as strings ("3.0", "")',
                    action_id=action_id))
    return actions


def score_actions(gt_actions: Mapping[str, Mapping], pred_actions: Mapping[str, Mapping],
                  gt_path: Path | str = "<annotations>", pred_path: Path | str = "<predictions>") -> ScoredActions:
    """Filter the ground truth and score each kept action the way the official evaluator does."""
    ids: list[str] = []
    truth: dict[str, list[int]] = {"action": [], "severity": []}
    correct: dict[str, list[bool]] = {"action": [], "severity": []}
    predicted: dict[str, list[int]] = {"action": [], "severity": []}
    missing: list[str] = []
    dropped = dict.fromkeys(labels.FILTER_RULES, 0)
    for action_id, raw in gt_actions.items():
        try:
            reason = labels.filter_reason(raw)
            label = labels.official_label(raw) if reason is None else None
        except KeyError as exc:
            raise AnnotationError(located(
                gt_path, f"unknown Action class {raw['Action class']!r} (the official evaluator crashes on it)",
                f"use one of {', '.join(labels.ACTION_CLASSES)}, 'Dont know' or ''", action_id=action_id)) from exc
        if label is None:
            dropped[reason] += 1
            continue
        ids.append(action_id)
        truth["action"].append(label.action)
        truth["severity"].append(label.severity)
        pred = pred_actions.get(action_id)
        if pred is None:
            missing.append(action_id)
            ok = {"action": False, "severity": False}
            decoded: tuple[int | None, int | None] = (None, None)
        else:
            ok = {"action": raw["Action class"] == pred["Action class"],
                  "severity": raw["Offence"] == pred["Offence"] and label.gt_severity_string == pred["Severity"]}
            decoded = labels.decode_prediction_entry(
                {k: v for k, v in pred.items() if k in ENTRY_FIELDS and isinstance(v, str)})
        for task, guess, true in (("action", decoded[0], label.action), ("severity", decoded[1], label.severity)):
            correct[task].append(ok[task])
            if ok[task]:
                predicted[task].append(true)
            else:
                predicted[task].append(-1 if guess is None or guess == true else guess)
    if missing:
        warnings.warn(
            f"{pred_path}: {len(missing)} of {len(ids)} kept actions have no prediction and count as wrong, as in "
            f"the official evaluator: {', '.join(missing)}. Fix: predict every action of {gt_path}",
            UserWarning, stacklevel=3)
    return ScoredActions(
        action_ids=ids,
        truth={t: np.asarray(v, dtype=np.int64) for t, v in truth.items()},
        correct={t: np.asarray(v, dtype=bool) for t, v in correct.items()},
        predicted={t: np.asarray(v, dtype=np.int64) for t, v in predicted.items()},
        missing=missing, dropped=dropped)


def metrics_from_scored(scored: ScoredActions) -> dict[str, float]:
    """The five official numbers, computed with the evaluator's own arithmetic (so they agree bit for bit)."""
    values = {}
    for task in ("severity", "action"):
        k = labels.NUM_CLASSES[task]
        gt = np.bincount(scored.truth[task], minlength=k).astype(np.float64)[None, :]
        hit = np.bincount(scored.truth[task][scored.correct[task]], minlength=k).astype(np.float64)[None, :]
        with np.errstate(divide="ignore", invalid="ignore"):
            values[task] = (sum(hit[0]) / sum(gt[0]), np.mean(hit / gt))
    leaderboard = values["severity"][1] * 0.5 + values["action"][1] * 0.5
    numbers = (values["severity"][0], values["action"][0], values["severity"][1], values["action"][1], leaderboard)
    return {key: float(value * 100) for key, value in zip(METRIC_KEYS, numbers)}


def official_metrics(gt_path: Path | str, pred_path: Path | str) -> dict[str, float]:
    """Same keys and values (percent) as SoccerNet.Evaluation.MV_FoulRecognition.evaluate(gt_path, pred_path)."""
    scored = score_actions(load_actions(gt_path, "annotations"), load_actions(pred_path, "predictions"),
                           gt_path, pred_path)
    return metrics_from_scored(scored)


def _task_report(task: str, scored: ScoredActions) -> dict[str, Any]:
    classes = list(labels.TASKS[task])
    k = len(classes)
    y_true, y_pred = scored.truth[task], scored.predicted[task]
    if len(y_true):
        precision, recall, f1, support = precision_recall_fscore_support(
            y_true, y_pred, labels=list(range(k)), zero_division=np.nan)
        matrix = confusion_matrix(y_true, y_pred, labels=list(range(k)) + [-1])[:k]
    else:
        precision = recall = f1 = np.full(k, np.nan)
        support = np.zeros(k, dtype=np.int64)
        matrix = np.zeros((k, k + 1), dtype=np.int64)
    return {
        "classes": classes,
        "support": [int(s) for s in support],
        "correct": [int(c) for c in np.bincount(y_true[scored.correct[task]], minlength=k)],
        "recall": [float(r) for r in recall],
        "precision": [float(p) for p in precision],
        "f1": [float(f) for f in f1],
        "confusion_matrix": matrix.tolist(),
        "confusion_rows": classes,
        "confusion_columns": classes + [UNSCORED],
    }


def detailed_report(gt_path: Path | str, pred_path: Path | str) -> dict[str, Any]:
    """The official numbers plus per-class recall / precision / F1 and confusion matrices (JSON-serializable).

    Rows of a confusion matrix are the official ground-truth classes; columns are the predicted classes plus
    UNSCORED. A prediction the evaluator scores correct sits on the diagonal, so each row's recall is the
    evaluator's per-class recall and the mean of the recalls is its balanced accuracy.
    """
    scored = score_actions(load_actions(gt_path, "annotations"), load_actions(pred_path, "predictions"),
                           gt_path, pred_path)
    return {
        "annotations": str(gt_path),
        "predictions": str(pred_path),
        "metrics": metrics_from_scored(scored),
        "kept": len(scored.action_ids),
        "dropped": dict(scored.dropped),
        "missing": list(scored.missing),
        "tasks": {task: _task_report(task, scored) for task in ("action", "severity")},
    }


def _prediction_dict(action_ids: Sequence[str], action_pred: Sequence[int], severity_pred: Sequence[int],
                     set_name: str | None = None) -> dict[str, Any]:
    action_pred = np.asarray(action_pred)
    severity_pred = np.asarray(severity_pred)
    ids = [str(a) for a in action_ids]
    if not (len(ids) == len(action_pred) == len(severity_pred)):
        raise ValueError(f"{len(ids)} action ids but {len(action_pred)} action and "
                         f"{len(severity_pred)} severity predictions")
    if len(set(ids)) != len(ids):
        raise ValueError("action ids must be unique")
    for task, pred in (("action", action_pred), ("severity", severity_pred)):
        if pred.size and (not np.issubdtype(pred.dtype, np.integer)
                          or pred.min() < 0 or pred.max() >= labels.NUM_CLASSES[task]):
            raise ValueError(f"{task} predictions must be class indices in 0..{labels.NUM_CLASSES[task] - 1}")
    content: dict[str, Any] = {} if set_name is None else {"Set": set_name}
    content["Actions"] = {i: labels.prediction_entry(a, s) for i, a, s in zip(ids, action_pred, severity_pred)}
    return content


def predictions_from_logits(action_ids: Sequence[str], action_logits: Any, severity_logits: Any,
                            set_name: str | None = None) -> dict[str, Any]:
    """Official prediction-file content ({"Actions": {...}}) from logits [N, 8] and [N, 4] (argmax per task)."""
    action_logits = np.asarray(action_logits)
    severity_logits = np.asarray(severity_logits)
    for task, logits in (("action", action_logits), ("severity", severity_logits)):
        if logits.ndim != 2 or logits.shape[1] != labels.NUM_CLASSES[task]:
            raise ValueError(f"{task} logits must have shape [N, {labels.NUM_CLASSES[task]}], got {logits.shape}")
    return _prediction_dict(action_ids, action_logits.argmax(axis=1), severity_logits.argmax(axis=1), set_name)


def write_json(path: Path | str, content: Any) -> Path:
    """JSON (NaN refused), replaced at once and flushed to the disk (fsutil.atomic_write)."""
    return atomic_write(path, json.dumps(jsonable(content, finite=True), indent=1, allow_nan=False) + "\n", fsync=True)


def write_predictions(path: Path | str, action_ids: Sequence[str], action_pred: Sequence[int],
                      severity_pred: Sequence[int], set_name: str | None = None) -> Path:
    """Write an official prediction file from class indices (atomically: a reader never sees half a file)."""
    return write_json(path, _prediction_dict(action_ids, action_pred, severity_pred, set_name))


def format_report(report: Mapping[str, Any]) -> str:
    """Human-readable text: the five official numbers, then a per-class table and confusion matrix per task."""
    rules = ", ".join(f"{rule}: {n}" for rule, n in report["dropped"].items() if n)
    lines = [f"Official SoccerNet MVFouls metric: {report['annotations']} vs {report['predictions']}",
             f"kept {report['kept']} actions; dropped {sum(report['dropped'].values())}"
             + (f" ({rules})" if rules else "")]
    if report["missing"]:
        lines.append(f"missing predictions (counted wrong): {len(report['missing'])}")
    lines += [f"  {key:<36} {value:8.3f}" for key, value in report["metrics"].items()]
    for task, table in report["tasks"].items():
        width = max(len(c) for c in table["classes"]) + 2
        header = f"  {'class':<{width}}{'support':>8}{'correct':>8}{'recall':>8}{'precision':>10}{'F1':>8}"
        lines += ["", f"{task}: per class", header]
        for i, name in enumerate(table["classes"]):
            lines.append(f"  {name:<{width}}{table['support'][i]:>8}{table['correct'][i]:>8}"
                         f"{table['recall'][i]:>8.3f}{table['precision'][i]:>10.3f}{table['f1'][i]:>8.3f}")
        columns = [str(i) for i in range(len(table["classes"]))] + ["other"]
        title = f"{task}: confusion matrix (rows = truth, columns = predicted class index; other = {UNSCORED})"
        lines += [title, "  " + " " * width + "".join(f"{c:>7}" for c in columns)]
        for name, row in zip(table["confusion_rows"], table["confusion_matrix"]):
            lines.append(f"  {name:<{width}}" + "".join(f"{v:>7}" for v in row))
    return "\n".join(lines)
