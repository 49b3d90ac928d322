"""After the last epoch: the deployed predictions and the official prediction files.

The trainer hands over the raw logits of every split (the ensemble's mean, or the best checkpoint's); this module
chooses the post-hoc logit adjustment on Valid (tau per task, against Train's class prior; Menon et al. 2021),
applies it, writes the official prediction file of every split and scores the labelled ones from those files, as
the official evaluator does.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import TrainingConfig
from ..evaluation.official import detailed_report, write_predictions
from ..fsutil import atomic_write, json_default
from ..labels import TASKS
from .losses import choose_tau, posthoc_adjust


@dataclass
class Deployed:
    logits: dict[str, dict[str, np.ndarray]]       # split -> task -> adjusted logits
    taus: dict[str, float]
    predictions: dict[str, Path]                   # split -> official prediction file
    official: dict[str, dict[str, float]]          # labelled split -> the official metric of its file
    per_class_recall: dict[str, dict[str, list]]


def deploy(cfg: TrainingConfig, raw: dict[str, dict[str, np.ndarray]], splits: dict[str, Any],
           train_counts: dict[str, np.ndarray], run_dir: Path) -> Deployed:
    """Post-hoc adjustment chosen on Valid, prediction files written and scored (``splits``: name -> source with
    action_ids, targets and annotations_path)."""
    # Class prior of Train, Laplace-smoothed so a class absent from Train gets a finite adjustment.
    prior = {t: (train_counts[t] + 1.0) / (train_counts[t].sum() + len(train_counts[t])) for t in TASKS}
    taus = {t: 0.0 for t in TASKS}
    if cfg.posthoc_adjust:
        grid = np.arange(0.0, cfg.posthoc_tau_max + 1e-9, 0.25)
        for t in TASKS:
            taus[t] = float(choose_tau(raw["valid"][t], splits["valid"].targets[t], prior[t], grid))
    final = {name: {t: _numpy(posthoc_adjust(lg[t], prior[t], taus[t])) for t in TASKS} for name, lg in raw.items()}
    predictions, official, per_class = {}, {}, {}
    for name, src in splits.items():
        path = run_dir / f"predictions_{name}.json"
        write_predictions(path, src.action_ids, final[name]["action"].argmax(1), final[name]["severity"].argmax(1))
        predictions[name] = path
        if src.annotations_path is not None:   # scored from the file, as the official evaluator does
            report = detailed_report(src.annotations_path, path)
            official[name] = report["metrics"]
            per_class[name] = {t: report["tasks"][t]["recall"] for t in TASKS}
    return Deployed(final, taus, predictions, official, per_class)


def write_summary(run_dir: Path, summary: dict[str, Any]) -> Path:
    """official_metrics.json of the run folder."""
    return atomic_write(run_dir / "official_metrics.json", json.dumps(summary, indent=2, default=json_default))


def _numpy(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
