"""CurriculumLearner as plain functions: per-sample difficulty, pacing, and each epoch's easy-to-hard subset.

Difficulty comes from a scoring pass (e.g. the previous phase's model over the training set): the per-sample
cross-entropy (``score="loss"``) or the negative margin ``max_{c != y} z_c - z_y`` (``score="margin"``), summed over
both tasks (a task whose target is negative, i.e. unknown, adds 0). Higher = harder.

Pacing: the fraction of the data used grows from ``start`` at the phase's first epoch to 1.0 once the phase's
progress ``u = epoch / (n_epochs - 1)`` reaches ``full_at``; with ``x = min(1, u / full_at)``:
- ``linear``: ``start + (1 - start) * x``
- ``root`` (Platanios et al. 2019): ``sqrt(start^2 + (1 - start^2) * x)``
- ``step``: ``start + (1 - start) * floor(x * steps) / steps`` (``steps`` = 3 equal jumps)

Selection: the ``ceil(fraction * N)`` easiest samples (ties broken by the rng), and then class coverage: every
class of both tasks that occurs in the data gets at least ``max(1, ceil(min_class_share * fraction * n_c))`` of its
own easiest samples (capped at n_c). Rare classes are usually the hardest, so pure global easy-first would drop
them for most of the phase; with the default ``min_class_share=1.0`` each class keeps at least its proportional
share, and ``min_class_share=0`` gives the bare guarantee of one sample per class.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..labels import NUM_CLASSES, TASKS

PACINGS = ("linear", "root", "step")


def _numpy(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def difficulty(logits: Mapping[str, Any], targets: Mapping[str, Any], score: str = "loss") -> np.ndarray:
    """Per-sample difficulty [N] (higher = harder), summed over the tasks present in ``logits``."""
    if score not in ("loss", "margin"):
        raise ValueError(f"score={score!r} must be 'loss' or 'margin'")
    total: np.ndarray | None = None
    for task, task_logits in logits.items():
        z = torch.as_tensor(_numpy(task_logits), dtype=torch.float64)
        y = torch.as_tensor(_numpy(targets[task]), dtype=torch.int64)
        known = y >= 0
        y_safe = y.clamp(min=0)
        if score == "loss":
            d = F.cross_entropy(z, y_safe, reduction="none")
        else:
            true = z.gather(1, y_safe[:, None]).squeeze(1)
            others = z.scatter(1, y_safe[:, None], -math.inf).max(dim=1).values
            d = others - true
        d = torch.where(known, d, torch.zeros_like(d)).numpy()
        total = d if total is None else total + d
    if total is None:
        raise ValueError("difficulty needs logits of at least one task")
    return total


def pacing_fraction(epoch: int, n_epochs: int, start: float, pacing: str, full_at: float, steps: int = 3) -> float:
    """Fraction of the data used at ``epoch`` (0-based) of a phase of ``n_epochs`` epochs."""
    if pacing not in PACINGS:
        raise ValueError(f"pacing={pacing!r} must be one of {', '.join(PACINGS)}")
    if not 0.0 < start <= 1.0:
        raise ValueError(f"start={start} must be in (0, 1]")
    u = 1.0 if n_epochs <= 1 else min(max(epoch / (n_epochs - 1), 0.0), 1.0)
    x = 1.0 if full_at <= 0 else min(1.0, u / full_at)
    if x >= 1.0:
        return 1.0
    if pacing == "linear":
        return start + (1.0 - start) * x
    if pacing == "root":
        return math.sqrt(start ** 2 + (1.0 - start ** 2) * x)
    return start + (1.0 - start) * math.floor(x * steps + 1e-9) / steps


def curriculum_indices(difficulty: np.ndarray, action: np.ndarray, severity: np.ndarray, epoch: int,
                       n_epochs: int, start: float, pacing: str, full_at: float, rng: np.random.Generator,
                       min_class_share: float = 1.0) -> np.ndarray:
    """Sorted indices of this epoch's curriculum subset (easy first, every class of both tasks present)."""
    d = np.asarray(difficulty, dtype=np.float64)
    labels = {"action": np.asarray(action, dtype=np.int64), "severity": np.asarray(severity, dtype=np.int64)}
    n = d.size
    if any(y.size != n for y in labels.values()):
        raise ValueError("difficulty, action and severity must have the same length")
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    fraction = pacing_fraction(epoch, n_epochs, start, pacing, full_at)
    order = np.lexsort((rng.random(n), d))          # easiest first, random among equal difficulties
    chosen = np.zeros(n, dtype=bool)
    chosen[order[: math.ceil(fraction * n - 1e-9)]] = True
    for task in TASKS:
        y = labels[task]
        for k in range(NUM_CLASSES[task]):
            members = order[y[order] == k]          # this class, easiest first
            if members.size == 0:
                continue
            need = min(members.size, max(1, math.ceil(min_class_share * fraction * members.size - 1e-9)))
            missing = need - int(chosen[members].sum())
            if missing > 0:
                chosen[members[~chosen[members]][:missing]] = True
    return np.flatnonzero(chosen).astype(np.int64)
