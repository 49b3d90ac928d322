"""DetailedMetrics: one record per epoch, with every field of the design, computed with sklearn.

Conventions (also used in the README's metric table):
- Every rate here (accuracy, recall, precision, F1, leaderboard) is a **fraction in [0, 1]**, sklearn's convention.
  The official SoccerNet evaluator reports percent; ``evaluate.py`` keeps its percent numbers untouched.
- Macro recall is computed over **all** classes of a task (``labels=range(n)``, ``zero_division=0``), so it equals
  balanced accuracy and the official evaluator's ``balanced_accuracy_*`` whenever every class occurs in the split
  (the official code returns NaN when a class is absent; we count that class's recall as 0 instead).
- ``leaderboard = 0.5 * macro_recall(action) + 0.5 * macro_recall(severity)``: the official leaderboard value on
  class indices. It matches the official evaluator except for its one string quirk (a Dive whose raw Offence is
  ""/"Between" can only be matched by that raw string), which ``evaluate.py`` reproduces from prediction files.
- ``epoch`` is the 0-based epoch inside ``phase``; ``step`` is the 0-based global epoch index over all phases
  (the MLflow step). Console output prints both 1-based.

MLflow metric names (``DetailedMetrics.to_mlflow``), ``{split}`` usually ``val``:
``train/loss``, ``{split}/loss``, ``{split}/leaderboard``, ``{split}/{task}/{accuracy|macro_recall|macro_precision|
macro_f1|weighted_f1|min_recall|classes_below_target}``, ``{split}/{task}/{recall|precision|f1|support|predicted}/
{class_slug}``, ``{split}/{task}/confusion/{true_slug}/{pred_slug}``, ``lr``, ``grad_norm``, ``phase``,
``system/{epoch_time_s|samples_per_s|peak_rss_mb|cuda_max_mb}``, ``stability/events``, ``stability/{kind}`` and
any ``extra`` scalars under their own names.
"""
from __future__ import annotations

import dataclasses
import json
import math
import resource
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

from ..fsutil import jsonable
from ..labels import CLASS_SLUGS, NUM_CLASSES, TASKS
from .targets import CLASS_RECALL_TARGET  # a class under this recall counts in `classes_below_target`

# Learning-curve series kept in every record (history so far, current epoch last).
CURVE_KEYS: tuple[str, ...] = (
    "train_loss", "val_loss", "action_macro_recall", "severity_macro_recall",
    "action_macro_f1", "severity_macro_f1", "leaderboard",
)
_NAN = float("nan")


@dataclass
class DetailedMetrics:
    """Everything measured at the end of one epoch (all rates are fractions in [0, 1])."""

    # ---- the design's fields -------------------------------------------------------------------------
    epoch: int
    phase: str
    train_loss: float = _NAN
    val_loss: float = _NAN
    action_accuracy: float = 0.0
    action_macro_f1: float = 0.0
    action_per_class_recall: list[float] = field(default_factory=list)
    severity_accuracy: float = 0.0
    severity_macro_f1: float = 0.0
    severity_per_class_recall: list[float] = field(default_factory=list)
    confusion_matrices: dict[str, np.ndarray] = field(default_factory=dict)   # task -> [n, n], rows = truth
    learning_curves: dict[str, list[float]] = field(default_factory=dict)     # CURVE_KEYS -> values per epoch
    # ---- per-class precision / F1, macro recall (= balanced accuracy) -----------------------------------
    action_macro_recall: float = 0.0
    action_macro_precision: float = 0.0
    action_weighted_f1: float = 0.0
    action_per_class_precision: list[float] = field(default_factory=list)
    action_per_class_f1: list[float] = field(default_factory=list)
    action_support: list[int] = field(default_factory=list)
    severity_macro_recall: float = 0.0
    severity_macro_precision: float = 0.0
    severity_weighted_f1: float = 0.0
    severity_per_class_precision: list[float] = field(default_factory=list)
    severity_per_class_f1: list[float] = field(default_factory=list)
    severity_support: list[int] = field(default_factory=list)
    leaderboard: float = 0.0          # 0.5 * (macro recall action + macro recall severity)
    # ---- optimisation and system ------------------------------------------------------------------------
    split: str = "val"                # the split the task metrics were computed on
    step: int = 0                     # global epoch index (0-based) over all phases
    phase_number: int = 0
    num_samples: int = 0              # samples in `split`
    lr: float | None = None
    grad_norm: float | None = None    # mean gradient norm over the epoch's optimizer steps
    epoch_time_s: float | None = None
    samples_per_s: float | None = None
    peak_rss_mb: float | None = None
    cuda_max_mb: float | None = None  # None without CUDA
    events: list[dict[str, Any]] = field(default_factory=list)   # StabilityGuard events of this epoch
    extra: dict[str, float] = field(default_factory=dict)        # any further scalars, logged under their keys

    # ---- per-task access -------------------------------------------------------------------------------
    def task_value(self, task: str, name: str) -> Any:
        """task_value('severity', 'per_class_recall') -> self.severity_per_class_recall."""
        if task not in TASKS:
            raise KeyError(f"unknown task {task!r}; tasks are {', '.join(TASKS)}")
        return getattr(self, f"{task}_{name}")

    def recalls(self) -> dict[str, list[float]]:
        """Per-class recall per task (what StabilityGuard.end_epoch and targeted_weights take)."""
        return {task: list(self.task_value(task, "per_class_recall")) for task in TASKS}

    def worst_class(self) -> tuple[str, str, float]:
        """(task, class_slug, recall) of the lowest per-class recall over both tasks."""
        worst = ("", "", math.inf)
        for task in TASKS:
            for slug, r in zip(CLASS_SLUGS[task], self.task_value(task, "per_class_recall")):
                if r < worst[2]:
                    worst = (task, slug, float(r))
        return worst

    # ---- export ----------------------------------------------------------------------------------------
    def to_mlflow(self) -> dict[str, float]:
        """Flat metric dict for MLflow batch logging (names in the module docstring); None values are left out."""
        s = self.split
        out: dict[str, float] = {metric_name("train", "loss"): self.train_loss, metric_name(s, "loss"): self.val_loss,
                                 metric_name(s, "leaderboard"): self.leaderboard, "phase": self.phase_number}
        for task in TASKS:
            slugs = CLASS_SLUGS[task]
            recalls = self.task_value(task, "per_class_recall")
            for name in ("accuracy", "macro_recall", "macro_precision", "macro_f1", "weighted_f1"):
                out[metric_name(s, task, name)] = self.task_value(task, name)
            if len(recalls):
                out[metric_name(s, task, "min_recall")] = min(recalls)
                out[metric_name(s, task, "classes_below_target")] = sum(r < CLASS_RECALL_TARGET for r in recalls)
            per_class = {"recall": recalls, "precision": self.task_value(task, "per_class_precision"),
                         "f1": self.task_value(task, "per_class_f1"), "support": self.task_value(task, "support")}
            cm = self.confusion_matrices.get(task)
            if cm is not None:
                per_class["predicted"] = np.asarray(cm).sum(axis=0).tolist()
            for metric, values in per_class.items():
                for slug, v in zip(slugs, values):
                    out[metric_name(s, task, metric, slug)] = v
            if cm is not None:
                for i, true_slug in enumerate(slugs):
                    for j, pred_slug in enumerate(slugs):
                        out[metric_name(s, task, "confusion", true_slug, pred_slug)] = np.asarray(cm)[i, j]
        optional = {"lr": self.lr, "grad_norm": self.grad_norm, "system/epoch_time_s": self.epoch_time_s,
                    "system/samples_per_s": self.samples_per_s, "system/peak_rss_mb": self.peak_rss_mb,
                    "system/cuda_max_mb": self.cuda_max_mb}
        out.update({k: v for k, v in optional.items() if v is not None})
        out["stability/events"] = len(self.events)
        for event in self.events:
            key = f"stability/{event.get('kind', 'unknown')}"
            out[key] = out.get(key, 0) + 1
        out.update(self.extra)
        return {k: float(v) for k, v in out.items() if v is not None}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (numpy arrays -> nested lists, numpy scalars -> Python numbers)."""
        return {f.name: jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def to_json(self) -> str:
        """One JSON line (non-finite floats are written as NaN/Infinity, which Python's json reads back)."""
        return json.dumps(self.to_dict())

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DetailedMetrics:
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values["confusion_matrices"] = {t: np.asarray(m, dtype=np.int64)
                                        for t, m in (values.get("confusion_matrices") or {}).items()}
        return cls(**values)

    @classmethod
    def from_json(cls, text: str | bytes | Mapping[str, Any]) -> DetailedMetrics:
        return cls.from_dict(text if isinstance(text, Mapping) else json.loads(text))


def metric_name(split: str, *parts: str) -> str:
    """The one metric-name scheme (README "Metric names in MLflow"): ``{split}/{task}/{metric}`` and
    ``{split}/{task}/{metric}/{class_slug}``, e.g. metric_name("val", "severity", "recall", "red_card");
    ``{split}/loss``, ``{split}/leaderboard``."""
    return "/".join((split, *parts))


def cross_entropy(logits: Mapping[str, Any], targets: Mapping[str, Any]) -> float:
    """Unweighted softmax cross-entropy of final logits, summed over the tasks (each the mean over the task's
    labelled actions; numpy, float64): the loss the targets and the A/B verdicts read for a scored split."""
    total = 0.0
    for task in TASKS:
        y = np.asarray(targets[task])
        keep = y >= 0
        z = np.asarray(logits[task], dtype=np.float64)[keep]
        if not keep.any():
            return math.nan
        z = z - z.max(axis=1, keepdims=True)
        log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        total += float(-log_p[np.arange(len(z)), y[keep]].mean())
    return total


def compute_task_metrics(task: str, y_true: Sequence[int] | np.ndarray,
                         y_pred: Sequence[int] | np.ndarray) -> dict[str, Any]:
    """sklearn metrics of one task over all its classes (labels=range(n), zero_division=0).

    Returns accuracy, macro_recall (= balanced accuracy), macro_precision, macro_f1, weighted_f1,
    per_class_recall / per_class_precision / per_class_f1 (lists of n floats), support (list of n ints)
    and confusion (int64 [n, n], rows = true class, columns = predicted class).
    """
    n = NUM_CLASSES[task]
    labels = list(range(n))
    y_true = np.asarray(y_true, dtype=np.int64).ravel()
    y_pred = np.asarray(y_pred, dtype=np.int64).ravel()
    if y_true.shape != y_pred.shape:
        raise ValueError(f"{task}: {y_true.size} targets but {y_pred.size} predictions")
    if y_true.size == 0:
        zeros = [0.0] * n
        return {"accuracy": 0.0, "macro_recall": 0.0, "macro_precision": 0.0, "macro_f1": 0.0, "weighted_f1": 0.0,
                "per_class_recall": zeros, "per_class_precision": zeros, "per_class_f1": zeros,
                "support": [0] * n, "confusion": np.zeros((n, n), dtype=np.int64)}
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, zero_division=0)
    _, _, weighted_f1, _ = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, average="weighted", zero_division=0)
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_recall": float(np.mean(recall)),
        "macro_precision": float(np.mean(precision)),
        "macro_f1": float(np.mean(f1)),
        "weighted_f1": float(weighted_f1),
        "per_class_recall": recall.astype(float).tolist(),
        "per_class_precision": precision.astype(float).tolist(),
        "per_class_f1": f1.astype(float).tolist(),
        "support": support.astype(int).tolist(),
        "confusion": confusion_matrix(y_true, y_pred, labels=labels).astype(np.int64),
    }


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MiB (resource.getrusage; KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def cuda_max_mb() -> float | None:
    """torch.cuda.max_memory_allocated in MiB, or None when CUDA is unavailable or was never used."""
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return None
    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return None
    return torch.cuda.max_memory_allocated() / (1024 * 1024)


def _event_dict(event: Any) -> dict[str, Any]:
    if dataclasses.is_dataclass(event) and not isinstance(event, type):
        return jsonable(dataclasses.asdict(event))
    if isinstance(event, Mapping):
        return jsonable(dict(event))
    raise TypeError(f"a stability event must be a dataclass or a mapping, got {type(event).__name__}")


def _curve_value(record: DetailedMetrics, key: str) -> float:
    value = getattr(record, key)
    return _NAN if value is None else float(value)


def compute_detailed_metrics(epoch: int, phase: str, split_logits: Mapping[str, Any], targets: Mapping[str, Any],
                             train_loss: float, val_loss: float, history: Sequence[DetailedMetrics] = (),
                             **extras: Any) -> DetailedMetrics:
    """One epoch's record from the evaluated split's logits (or any [N, C] scores; argmax = prediction).

    ``split_logits``/``targets``: {"action": [N, 8], "severity": [N, 4]} and {"action": [N], "severity": [N]}
    (numpy arrays or CPU tensors). ``history``: the records of earlier epochs (learning curves are rebuilt from
    them plus this one). ``extras``: any other DetailedMetrics field (step, phase_number, split, lr, grad_norm,
    epoch_time_s, samples_per_s, events, extra, ...). ``peak_rss_mb`` and ``cuda_max_mb`` are measured here
    unless given.
    """
    known = {f.name for f in dataclasses.fields(DetailedMetrics)}
    unknown = sorted(set(extras) - known)
    if unknown:
        raise TypeError(f"compute_detailed_metrics got unknown fields: {', '.join(unknown)}")
    values: dict[str, Any] = {"epoch": int(epoch), "phase": str(phase),
                              "train_loss": float(train_loss), "val_loss": float(val_loss)}
    confusion: dict[str, np.ndarray] = {}
    num_samples = 0
    for task in TASKS:
        logits = np.asarray(split_logits[task], dtype=np.float64)
        y_true = np.asarray(targets[task], dtype=np.int64)
        m = compute_task_metrics(task, y_true, logits.argmax(axis=1) if logits.size else np.zeros(0, np.int64))
        confusion[task] = m.pop("confusion")
        values.update({f"{task}_{k}": v for k, v in m.items()})
        num_samples = int(y_true.size)
    values["confusion_matrices"] = confusion
    values["leaderboard"] = 0.5 * (values["action_macro_recall"] + values["severity_macro_recall"])
    values["num_samples"] = num_samples
    values["peak_rss_mb"] = peak_rss_mb()
    values["cuda_max_mb"] = cuda_max_mb()
    values.update(extras)
    values["events"] = [_event_dict(e) for e in values.get("events") or []]
    values["extra"] = {str(k): float(v) for k, v in (values.get("extra") or {}).items()}
    record = DetailedMetrics(**values)
    record.learning_curves = {key: [_curve_value(r, key) for r in (*history, record)] for key in CURVE_KEYS}
    return record
