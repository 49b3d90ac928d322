"""SmartRebalancer as plain functions: capped class weights, per-sample sampler weights, the balanced subset.

Class weights (``class_weights``): inverse frequency ``1 / n_c`` over the classes present (n_c > 0), compressed so
the largest weight is at most ``cap`` times the smallest (the design's cap: "up to 10x" means max/min <= 10), then
normalized to mean 1 over the present classes (normalizing keeps the ratios, so the cap holds exactly). Each
weight is ``min(n_max / n_c, cap)`` before normalizing: classes up to ``cap`` times rarer than the most frequent
one get their full inverse-frequency weight, rarer ones share the cap. Absent classes get weight 1. Example, the
real Train severity counts 304/1303/685/27: [0.31, 0.072, 0.137, 3.48] uncapped (48x), [1.125, 0.75, 1.125,
1.125] at cap 1.5 and [1.33, 0.44, 0.85, 1.33] at cap 3 (max/min = 3).

Sample weights (``sample_weights``), for ``torch.utils.data.WeightedRandomSampler``: per task, a weight per class,
normalized so the weights average 1 over the *samples*:
- ``none``: 1 (instance-balanced); ``balanced``: N / (C * n_y) (every class gets the same sampling mass);
- ``sqrt``: proportional to n_y^(-1/2); ``progressive`` (Kang et al. 2020): ``(1 - t) * 1 + t * N / (C * n_y)``,
  t = ``progress`` in [0, 1], from instance-balanced (t = 0) to class-balanced (t = 1).
Both tasks are combined by the **arithmetic mean** of the two per-task weights. With ``balanced`` this guarantees
every class of each task at least half of its class-balanced sampling mass (the product would not: it lets the
rarest action-severity pairs dominate). ``oversample`` ("severity:3=8,action:7=4", class index or slug) then
multiplies the weight of every sample of those classes (by each matching factor). Results average 1.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import WeightedRandomSampler

from ..errors import ConfigError, located
from ..labels import CLASS_SLUGS, NUM_CLASSES, TASKS

SAMPLE_KINDS = ("none", "balanced", "sqrt", "progressive")


def class_weights(counts: Sequence[int] | np.ndarray, cap: float | None) -> np.ndarray:
    """Inverse-frequency class weights with max/min <= ``cap``, mean 1 over present classes (module docstring).

    ``cap`` None or inf: plain inverse frequency, mean 1.
    """
    c = np.asarray(counts, dtype=np.float64)
    if c.ndim != 1 or (c < 0).any():
        raise ValueError(f"class counts must be a 1-D array of non-negative counts, got {c!r}")
    w = np.ones_like(c)
    present = c > 0
    if present.any():
        w[present] = 1.0 / c[present]
    return _cap(w, present, cap)


def _cap(w: np.ndarray, present: np.ndarray, cap: float | None) -> np.ndarray:
    """Compress the present classes' weights to max/min <= cap, then normalize them to mean 1."""
    w = w.astype(np.float64, copy=True)
    if not present.any():
        return w
    if cap is not None and math.isfinite(cap):
        if not cap >= 1:
            raise ConfigError(located("config", f"class-weight cap {cap} must be >= 1 (the largest class weight "
                                      "over the smallest)", "set max_weight_phase1/2/3 to 1 or more"))
        low = w[present].min()
        w[present] = np.minimum(w[present], low * cap)
    w[present] = w[present] / w[present].mean()
    return w


def targeted_weights(counts: Sequence[int] | np.ndarray, recalls: Sequence[float] | np.ndarray, cap: float | None,
                     target: float = 0.45, strength: float = 1.0) -> np.ndarray:
    """Phase-3 weights: inverse frequency boosted for classes still under ``target`` recall, capped like
    class_weights (max/min <= ``cap``, mean 1).

    ``w_c = (1 / n_c) * (1 + strength * max(0, target - r_c) / target)``: a class at 0 recall gets ``1 + strength``
    times its weight, a class at or above ``target`` (default: the design's 45% goal) none. NaN recalls (class
    absent from the held-out part of Train) get no boost.
    """
    c = np.asarray(counts, dtype=np.float64)
    r = np.asarray(recalls, dtype=np.float64)
    if r.shape != c.shape:
        raise ValueError(f"{r.size} recalls for {c.size} classes")
    present = c > 0
    base = np.ones_like(c)
    base[present] = 1.0 / c[present]
    gap = np.where(np.isnan(r), 0.0, np.clip(target - r, 0.0, None) / target)
    return _cap(base * (1.0 + strength * gap), present, cap)


def parse_oversample(spec: str) -> dict[tuple[str, int], float]:
    """"severity:3=8,action:dive=4" -> {("severity", 3): 8.0, ("action", 7): 4.0}."""
    out: dict[tuple[str, int], float] = {}
    fix = 'write task:class=factor items separated by commas, e.g. "severity:3=8,action:7=4"'
    for item in filter(None, (s.strip() for s in spec.split(","))):
        try:
            key, factor_text = item.split("=")
            task, cls = (s.strip() for s in key.split(":"))
            factor = float(factor_text)
        except ValueError:
            raise ConfigError(located("oversample", f"cannot parse {item!r}", fix)) from None
        if task not in TASKS:
            raise ConfigError(located("oversample", f"unknown task {task!r} in {item!r}", f"use one of {', '.join(TASKS)}"))
        if cls in CLASS_SLUGS[task]:
            index = CLASS_SLUGS[task].index(cls)
        elif cls.isdigit() and int(cls) < NUM_CLASSES[task]:
            index = int(cls)
        else:
            raise ConfigError(located("oversample", f"unknown {task} class {cls!r} in {item!r}",
                                      f"use 0..{NUM_CLASSES[task] - 1} or one of {', '.join(CLASS_SLUGS[task])}"))
        if not factor > 0:
            raise ConfigError(located("oversample", f"factor {factor} in {item!r} must be > 0", fix))
        out[(task, index)] = factor
    return out


def _labels(task: str, y: Sequence[int] | np.ndarray) -> np.ndarray:
    y = np.asarray(y, dtype=np.int64)
    if y.size and (y.min() < 0 or y.max() >= NUM_CLASSES[task]):
        raise ValueError(f"{task} labels must lie in 0..{NUM_CLASSES[task] - 1}; got {y.min()}..{y.max()}")
    return y


def _task_weights(y: np.ndarray, n_classes: int, kind: str, progress: float) -> np.ndarray:
    n = y.size
    counts = np.bincount(y, minlength=n_classes).astype(np.float64)
    present = int((counts > 0).sum())
    if kind == "none":
        return np.ones(n)
    balanced = n / (present * counts[y])
    if kind == "balanced":
        return balanced
    if kind == "progressive":
        t = min(max(float(progress), 0.0), 1.0)
        return (1.0 - t) + t * balanced
    if kind == "sqrt":
        w = 1.0 / np.sqrt(counts[y])
        return w / w.mean()
    raise ConfigError(located("config", f"sampler kind {kind!r} is unknown", f"use one of {', '.join(SAMPLE_KINDS)}"))


def sample_weights(action: Sequence[int] | np.ndarray, severity: Sequence[int] | np.ndarray, kind: str,
                   progress: float = 1.0, oversample: str = "") -> np.ndarray:
    """Per-sample sampling weights (mean 1) for WeightedRandomSampler; see the module docstring for the rule."""
    labels = {"action": _labels("action", action), "severity": _labels("severity", severity)}
    if labels["action"].shape != labels["severity"].shape:
        raise ValueError("action and severity label arrays differ in length")
    if labels["action"].size == 0:
        return np.zeros(0)
    w = np.mean([_task_weights(y, NUM_CLASSES[t], kind, progress) for t, y in labels.items()], axis=0)
    for (task, index), factor in parse_oversample(oversample).items():
        w = np.where(labels[task] == index, w * factor, w)
    return w / w.mean()


def weighted_sampler(weights: np.ndarray, num_samples: int | None = None,
                     generator: torch.Generator | None = None) -> WeightedRandomSampler:
    """WeightedRandomSampler (with replacement) over ``weights``, one epoch = len(weights) draws by default."""
    return WeightedRandomSampler(torch.as_tensor(weights, dtype=torch.double),
                                 num_samples=len(weights) if num_samples is None else num_samples,
                                 replacement=True, generator=generator)


def balanced_subset(action: Sequence[int] | np.ndarray, severity: Sequence[int] | np.ndarray,
                    rng: np.random.Generator, per_class: int | None = None, factor: float = 2.0) -> np.ndarray:
    """Indices of a class-balanced subset over both tasks (phase 1), sorted, deterministic for ``rng``.

    Rule: ``m = per_class`` or, by default, ``ceil(factor * n_min)`` with ``n_min`` the rarest class count of
    either task (real Train: 27 red cards -> m = 54). Classes of both tasks are visited from rarest to most
    frequent; each gets samples until it holds ``min(m, n_c)`` of them in the subset (samples already taken for
    the other task count). Among a class's candidates, those whose *other-task* class is least represented so
    far are taken first (ties broken by ``rng``), which spreads the cross-task overflow. Every class of each task
    ends with at least ``min(m, n_c)`` samples; a class can exceed m only through the other task's picks.
    """
    labels = {"action": _labels("action", action), "severity": _labels("severity", severity)}
    n = labels["action"].size
    if labels["severity"].size != n:
        raise ValueError("action and severity label arrays differ in length")
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    counts = {t: np.bincount(y, minlength=NUM_CLASSES[t]) for t, y in labels.items()}
    n_min = min(int(c[c > 0].min()) for c in counts.values())
    m = int(per_class) if per_class is not None else math.ceil(factor * n_min)
    if m < 1:
        raise ValueError(f"per_class={m} must be >= 1")
    order = sorted((int(counts[t][k]), t, k) for t in TASKS for k in range(NUM_CLASSES[t]) if counts[t][k] > 0)
    chosen = np.zeros(n, dtype=bool)
    taken = {t: np.zeros(NUM_CLASSES[t], dtype=np.int64) for t in TASKS}
    tiebreak = rng.random(n)
    for _, task, k in order:
        other = "severity" if task == "action" else "action"
        need = min(m, int(counts[task][k])) - int(taken[task][k])
        for _ in range(max(need, 0)):
            candidates = np.flatnonzero((labels[task] == k) & ~chosen)
            load = taken[other][labels[other][candidates]]
            # least-represented other-task class first, then the random tie-break
            i = candidates[np.lexsort((tiebreak[candidates], load))[0]]
            chosen[i] = True
            for t in TASKS:
                taken[t][labels[t][i]] += 1
    return np.flatnonzero(chosen).astype(np.int64)
