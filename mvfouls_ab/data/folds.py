"""Stratified splits of a labelled split: the joint action x severity label, k folds, and a held-out part.

`holdout_split` carves the part of Train that the learned representation stops on and that phase-3 targeted
weights are measured on, so Valid stays for epoch and trial selection only. It depends on the labels alone (a
fixed seed), so every run on the same data holds out the same actions.
"""
from __future__ import annotations

import warnings
from collections import Counter

import numpy as np

HOLDOUT_SEED = 0


def stratification_labels(action: np.ndarray, severity: np.ndarray, n_folds: int) -> np.ndarray:
    """Joint action x severity label; combinations rarer than n_folds merged (action, then severity, then one)."""
    joint = np.array([f"a{a}s{s}" for a, s in zip(action, severity)], dtype=object)
    for coarser in ([f"a{a}" for a in action], [f"s{s}" for s in severity], ["rare"] * len(action)):
        counts = Counter(joint)
        rare = np.array([counts[j] < n_folds for j in joint])
        if not rare.any():
            break
        joint[rare] = np.array(coarser, dtype=object)[rare]
    counts = Counter(joint)
    if 0 < counts.get("rare", 0) < n_folds:   # still too few: they join the largest group
        joint[joint == "rare"] = counts.most_common(1)[0][0]
    return joint.astype(str)


def fold_assignment(action: np.ndarray, severity: np.ndarray, n_folds: int, seed: int) -> np.ndarray:
    """Fold index (0..n_folds-1) of every action: StratifiedKFold on the joint label, shuffled with `seed`."""
    from sklearn.model_selection import StratifiedKFold

    y = stratification_labels(np.asarray(action), np.asarray(severity), n_folds)
    out = np.full(len(y), -1, dtype=np.int64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "least populated class" on tiny data sets
        splitter = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
        for f, (_, held_out) in enumerate(splitter.split(np.zeros(len(y)), y)):
            out[held_out] = f
    return out


def holdout_split(action: np.ndarray, severity: np.ndarray, share: float,
                  seed: int = HOLDOUT_SEED) -> tuple[np.ndarray, np.ndarray]:
    """(fit, holdout) sorted index arrays: about `share` of the actions held out, stratified on the joint label
    (every class with at least 2 examples keeps at least one on each side). share 0: everything is fit."""
    n = len(action)
    if share <= 0 or n < 4:
        return np.arange(n, dtype=np.int64), np.zeros(0, dtype=np.int64)
    rng = np.random.default_rng(seed)
    groups = stratification_labels(np.asarray(action), np.asarray(severity), 2)
    held: set[int] = set()
    for g in sorted(set(groups)):                   # the share of each joint-label group, randomly rounded
        members = rng.permutation(np.flatnonzero(groups == g))
        held.update(members[:int(np.floor(share * len(members) + rng.random()))].tolist())
    for task_y in (np.asarray(action), np.asarray(severity)):   # every class of 2+ on both sides
        for c in np.unique(task_y):
            members = np.flatnonzero(task_y == c)
            if len(members) < 2:
                continue
            inside = [int(i) for i in members if int(i) in held]
            if not inside:
                held.add(int(rng.choice(members)))
            elif len(inside) == len(members):
                held.discard(int(rng.choice(members)))
    holdout = np.array(sorted(held), dtype=np.int64)
    return np.setdiff1d(np.arange(n), holdout).astype(np.int64), holdout
