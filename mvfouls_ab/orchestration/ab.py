"""A/B experiments: arms x seeds x cross-validation folds, run resumably through an Optuna storage, then verdicts.

An experiment (experiments/ab_NAME.yaml) is a shared base TrainingConfig and a few arms, each a set of overrides;
the first arm (or `control:`) is the control A, every other arm is a B compared with it (experiments/README in the
YAML files says what each compares). A *cell* is one (arm, seed, fold): train with TrainingConfig(seed=seed) on the
fold's training part, select on an inner validation split of that training part, score on the held-out fold.

Folds: Train+Valid actions are pooled and cut into k stratified folds (sklearn StratifiedKFold on the joint
action x severity label; a combination with fewer than k actions is merged into its action class, then its
severity class, then one "rare" group). The partition is reshuffled per seed (repeated k-fold), and every arm sees
the same partition for a given seed, so cells pair across arms. Test is never touched by the folds.

Nested selection: a cell never lets the fold it is scored on choose anything. Its k - 1 training folds are split
again, with the same stratification helper, into an inner Train and an inner Valid (1 / INNER_FOLDS of them,
seeded by (seed, fold) so every arm gets the same inner split). The cell's DataBundle is (Train = inner Train,
Valid = inner Valid, Test = the held-out fold): the trainer picks its epoch(s) and the post-hoc tau on Valid, as it
always does, and predicts Test with what it would deploy (ensemble and post-hoc adjustment included when the arm
uses them). The verdict metrics (`heldout/...`) are computed from those deployed predictions of the held-out
fold. The three parts are written as official annotations.json files
(`<out>/folds/k<K>/seed<S>/fold<F>/{Train,Valid,Test}/annotations.json`, actions renumbered 0..n-1, the original
`Split/id` kept in the top-level "Source" map) so the trainer's official metric works on them unchanged.

Efficiency: each cell also records `system/wall_s` (the trainer's wall time), `system/peak_rss_mb` (the process's
peak resident memory during this cell only: the kernel's high-water mark is reset at the cell's start through
/proc/self/clear_refs, else a sampling thread measures it) and, on a GPU, `system/cuda_max_mb` (peak allocated,
reset per cell). They are verdict metrics (lower is better) outside the Holm family of the quality metrics. The
inputs cells share through the disk cache (a learned representation, cached embeddings) are built before the clock
starts (warm_inputs), so the figures do not depend on which arm reached a (seed, fold) first.

Storage (resume and parallel workers): cells are trials of the Optuna study `ab-NAME` in the same RDB storage as
the HPO study (default sqlite:///optuna.db; postgresql://... for workers on several machines). Each cell is an
enqueued trial whose user attributes name it (`cell` key = arm/seed/fold/k/config hash); a worker claims a WAITING
trial atomically (RUNNING), keeps a heartbeat while it trains, and stores the cell's metrics, scored record,
learning curves, stability events and official scores as user attributes before marking it COMPLETE (value = the
held-out leaderboard value). A new invocation enqueues only cells that have no COMPLETE, WAITING or RUNNING trial, so
finished cells are never rerun; a worker that died is detected by its stale heartbeat (its trial becomes FAIL) and
its cell is enqueued again, and the trainer resumes it from the cell folder's last checkpoint. Changing an arm's
config changes the config hash, hence the cell keys: stale results are never mixed in.

Verdicts (stats.py: the corrected resampled t-test, Holm, MDE) come from one function, analyze_cells,
on a long table `arm,seed,fold,metric,value`: the runner writes its cells as that table (cells.csv) and
`python -m mvfouls_ab.ab analyze --cells cells.csv` reads it back (or a table made anywhere else).

MLflow: experiment `ab-NAME`; a parent run for the experiment, a nested run per arm, and a nested run per cell under
its arm (the trainer's MLflowSink logs every epoch there; the held-out scores go there as `heldout/...`). The
verdict table and the report go to the parent run.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import socket
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

import numpy as np
import yaml

from ..config import PROFILES, TrainingConfig, coerce, load_config
from ..data.folds import fold_assignment, stratification_labels  # noqa: F401 - stratification_labels re-exported
from ..errors import AnalysisError, ConfigError, StudyError, located
from ..evaluation.metrics import metric_name
from ..fsutil import atomic_path, atomic_write, jsonable
from ..labels import CLASS_SLUGS, TASKS
from . import stats, workers
from .storage import DEFAULT_STORAGE, open_storage

if TYPE_CHECKING:
    from ..data.dataset import DataBundle
    from ..training.trainer import RunResult


log = logging.getLogger(__name__)

SCORED = "heldout"                       # metric prefix of the held-out fold's scores
PRIMARY_METRIC = metric_name(SCORED, "leaderboard")
EFFICIENCY_METRICS = ("system/wall_s", "system/peak_rss_mb", "system/cuda_max_mb")
INNER_FOLDS = 5                          # inner Valid = 1 / INNER_FOLDS of a cell's training folds
CELL_COLUMNS = ("arm", "seed", "fold", "metric", "value")
HEARTBEAT_S = 20
GRACE_S = 90
EXPERIMENT_KEYS = {"name", "description", "profile", "base_config", "base", "control", "arms", "seeds", "folds",
                   "epoch_scale"}
ARM_KEYS = {"seed_offset", "description", "config"}   # arm keys that are not TrainingConfig fields
EPOCH_KEYS = ("phase1_epochs", "phase2_epochs", "phase3_epochs")


def quality_metrics() -> list[str]:
    """The quality metrics every comparison is judged on, one Holm family (the held-out fold, deployed model)."""
    names = [PRIMARY_METRIC]
    names += [metric_name(SCORED, task, "macro_recall") for task in TASKS]
    names += [metric_name(SCORED, task, "macro_f1") for task in TASKS]
    names += [metric_name(SCORED, task, "recall", slug) for task in TASKS for slug in CLASS_SLUGS[task]]
    return names


def valid_name(name: str) -> bool:
    """Experiment and arm names: letters, digits, _ and - (they become folder, study and run names)."""
    return bool(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]{0,99}", name))


def verdict_metrics() -> list[str]:
    """Every metric of a comparison: the quality family, then efficiency (`system/...`, its own family; the
    CUDA one only where a cell ran on a GPU)."""
    return quality_metrics() + list(EFFICIENCY_METRICS)


# ---- experiments --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Arm:
    name: str
    overrides: dict[str, Any]
    seed_offset: int = 0          # A/A tests: the same recipe under other seeds
    description: str = ""


@dataclass(frozen=True)
class Cell:
    arm: str
    seed: int
    fold: int
    folds: int
    config_hash: str

    @property
    def key(self) -> str:
        return f"{self.arm}/s{self.seed}/f{self.fold}/k{self.folds}/{self.config_hash}"


@dataclass(frozen=True)
class Experiment:
    name: str
    description: str
    base: TrainingConfig
    arms: tuple[Arm, ...]
    control: str
    seeds: int
    folds: int
    source: str = ""
    epoch_scale: float = 1.0      # every arm's phase epochs x this (rounded, >= 1 for a phase that has epochs)
    final: dict[str, Any] = field(default_factory=dict)   # CLI --set: applied last, to every arm

    @property
    def study_name(self) -> str:
        return f"ab-{self.name}"

    def arm(self, name: str) -> Arm:
        for arm in self.arms:
            if arm.name == name:
                return arm
        raise KeyError(name)

    @property
    def treatments(self) -> list[str]:
        return [a.name for a in self.arms if a.name != self.control]

    def config(self, arm: str, seed: int) -> TrainingConfig:
        """base -> arm (its config file, then its overrides) -> epoch_scale -> CLI --set; seed = seed + offset."""
        a = self.arm(arm)
        cfg = self.base.replace(**a.overrides)
        if self.epoch_scale != 1.0:
            cfg = cfg.replace(**{k: max(1, round(getattr(cfg, k) * self.epoch_scale)) if getattr(cfg, k) else 0
                                 for k in EPOCH_KEYS})
        return cfg.replace(**self.final, seed=int(seed) + a.seed_offset)

    def config_hash(self, arm: str) -> str:
        return hashlib.sha1(self.config(arm, 0).fingerprint().encode()).hexdigest()[:8]

    def cells(self) -> list[Cell]:
        """Every cell, seed-major, so that a partial run has complete (seed, fold) pairs across arms early."""
        hashes = {a.name: self.config_hash(a.name) for a in self.arms}
        return [Cell(a.name, s, f, self.folds, hashes[a.name])
                for s in range(self.seeds) for f in range(self.folds) for a in self.arms]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description, "control": self.control,
                "seeds": self.seeds, "folds": self.folds, "source": self.source, "epoch_scale": self.epoch_scale,
                "final": dict(self.final),
                "arms": [dataclasses.asdict(a) for a in self.arms],
                "base": {k: v for k, v in self.base.flat().items() if v != getattr(TrainingConfig(), k)}}


def experiment_from_dict(doc: dict[str, Any]) -> Experiment:
    """Inverse of Experiment.to_dict (the design as stored in the study, for reports and other workers)."""
    base = TrainingConfig().replace(**doc.get("base", {}))
    arms = tuple(Arm(a["name"], dict(a["overrides"]), int(a.get("seed_offset", 0)), a.get("description", ""))
                 for a in doc["arms"])
    return Experiment(doc["name"], doc.get("description", ""), base, arms, doc["control"], int(doc["seeds"]),
                      int(doc["folds"]), doc.get("source", ""), float(doc.get("epoch_scale", 1.0)),
                      dict(doc.get("final") or {}))


def stored_experiment(name: str, storage_url: str) -> Experiment:
    """The design of experiment NAME (or a path to its YAML) as recorded in the storage by `ab`."""
    import optuna

    if name.endswith((".yaml", ".yml")):
        name = Path(name).stem.removeprefix("ab_")
    storage = open_storage(storage_url)
    study_name = name if name.startswith("ab-") else f"ab-{name}"
    try:
        study = optuna.load_study(study_name=study_name, storage=storage)
    except KeyError:
        known = [s.study_name for s in optuna.get_all_study_summaries(storage) if s.study_name.startswith("ab-")]
        raise StudyError(located(storage_url, f"no A/B experiment {study_name!r} in this storage",
                                 f"run python -m mvfouls_ab.ab --experiment experiments/ab_{name}.yaml first, or use "
                                 f"one of: {', '.join(known) or 'none stored'}")) from None
    doc = study.user_attrs.get("experiment")
    if not doc:
        raise StudyError(located(storage_url, f"study {study_name!r} is not an A/B experiment",
                                 "use python -m mvfouls_ab.report --study NAME for an HPO study"))
    return experiment_from_dict(doc)


def load_experiment(path: str | Path, seeds: int | None = None, folds: int | None = None,
                    profile: str | None = None, overrides: Sequence[str] | None = None,
                    epoch_scale: float | None = None) -> Experiment:
    """Read experiments/ab_NAME.yaml.

    Each arm's config: hardware profile -> base_config file -> base -> the arm's `config:` file -> the arm's keys
    -> epoch_scale -> `overrides` (CLI --set, the last word).
    """
    from ..training.registry import check_registered

    p = Path(path)
    if not p.is_file():
        raise ConfigError(located(p, "experiment file not found",
                                  "pass one of experiments/ab_*.yaml (python -m mvfouls_ab.ab --experiment FILE)"))
    try:
        doc = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(located(p, f"not valid YAML ({exc})", "fix the YAML syntax")) from None
    if not isinstance(doc, dict):
        raise ConfigError(located(p, "top level must be a mapping", f"use the keys {', '.join(sorted(EXPERIMENT_KEYS))}"))
    unknown = sorted(set(doc) - EXPERIMENT_KEYS)
    if unknown:
        raise ConfigError(located(p, f"unknown experiment keys {unknown}", f"use {', '.join(sorted(EXPERIMENT_KEYS))}"))
    name = str(doc.get("name") or p.stem.removeprefix("ab_"))
    if not valid_name(name):       # it names the output folder, the Optuna study and the MLflow experiment
        raise ConfigError(located(p, f"experiment name {name!r} has odd characters",
                                  "use letters, digits, _ and - (at most 100), like arm names"))
    profile = profile or doc.get("profile") or "cpu"
    if profile not in PROFILES:
        raise ConfigError(located(p, f"profile {profile!r} is unknown", f"use one of {', '.join(PROFILES)}"))
    base = load_config(overrides=dict(PROFILES[profile]))
    if doc.get("base_config"):
        base_path = Path(doc["base_config"])
        if not base_path.is_absolute() and not base_path.is_file():
            base_path = p.parent.parent / base_path   # relative to the repository root
        base = load_config(base_path, base=base)
    base_over = doc.get("base") or {}
    if not isinstance(base_over, dict):
        raise ConfigError(located(p, "`base` must be a mapping of TrainingConfig keys", "write base: {key: value}"))
    base = load_config(overrides={k: coerce(k, v, f"{p} base") for k, v in base_over.items()}, base=base)
    given = load_config(overrides=list(overrides or []))          # validates and coerces the --set values
    final = {k: getattr(given, k) for k in (o.split("=", 1)[0].strip() for o in overrides or [])}

    arms_doc = doc.get("arms")
    if not isinstance(arms_doc, dict) or len(arms_doc) < 2:
        raise ConfigError(located(p, "an experiment needs at least two arms",
                                  "write arms: {control_name: {overrides}, other_name: {overrides}}"))
    arms = []
    for arm_name, over in arms_doc.items():
        if not isinstance(over, (dict, type(None))):
            raise ConfigError(located(p, f"arm {arm_name!r} is not a mapping", "write arm: {key: value, ...}"))
        over = dict(over or {})
        extra = {k: over.pop(k) for k in list(over) if k in ARM_KEYS}
        values: dict[str, Any] = {}
        if extra.get("config"):
            arm_file = Path(extra["config"])
            if not arm_file.is_absolute() and not arm_file.is_file():
                arm_file = p.parent.parent / arm_file
            values.update({k: v for k, v in load_config(arm_file).flat().items() if k in _keys_of(arm_file)})
        values.update({k: coerce(k, v, f"{p} arm {arm_name}") for k, v in over.items()})
        check_registered(base.replace(**values))  # validates the combination (the registries' names too)
        if not str(arm_name).replace("_", "").replace("-", "").isalnum():
            raise ConfigError(located(p, f"arm name {arm_name!r} has odd characters", "use letters, digits, _ and -"))
        arms.append(Arm(str(arm_name), values, int(extra.get("seed_offset", 0)), str(extra.get("description", ""))))
    control = str(doc.get("control") or arms[0].name)
    if control not in {a.name for a in arms}:
        raise ConfigError(located(p, f"control arm {control!r} is not one of the arms", "name one of the arms"))
    n_seeds = int(seeds if seeds is not None else doc.get("seeds", 5))
    n_folds = int(folds if folds is not None else doc.get("folds", 5))
    if n_seeds < 1 or n_folds < 2:
        raise ConfigError(located(p, f"seeds={n_seeds}, folds={n_folds}", "use seeds >= 1 and folds >= 2"))
    scale = float(epoch_scale if epoch_scale is not None else doc.get("epoch_scale", 1.0))
    if scale <= 0:
        raise ConfigError(located(p, f"epoch_scale={scale}", "use a positive factor, e.g. 0.2 for a quick CPU run"))
    return Experiment(name, str(doc.get("description", "")).strip(), base, tuple(arms), control, n_seeds, n_folds,
                      str(p), scale, final)


def _keys_of(path: Path) -> set[str]:
    """The TrainingConfig keys a YAML file sets (load_config has validated it already)."""
    return set(yaml.safe_load(path.read_text()) or {}) - {"description"}


# ---- folds --------------------------------------------------------------------------------------------------
def _fold_split(name: str, actions: list, sources: list[str], path: Path, root: Path, note: str):
    """A SplitAnnotations of re-numbered actions, written as an official annotations.json first."""
    from ..data.annotations import SplitAnnotations

    renumbered = [dataclasses.replace(a, action_id=str(i)) for i, a in enumerate(actions)]
    doc = {"Set": name.lower(), "Fold": note, "Number of actions": len(renumbered),
           "Source": {a.action_id: s for a, s in zip(renumbered, sources)},
           "Actions": {a.action_id: {**a.raw, "Clips": [
               {"Url": c.url, "Camera type": c.camera_type, "Timestamp": c.timestamp, "Replay speed": c.replay_speed}
               for c in a.clips]} for a in renumbered}}
    atomic_write(path, json.dumps(doc, indent=1))
    extra = {k: v for k, v in doc.items() if k != "Actions"}
    return SplitAnnotations(name, root, renumbered, {}, len(renumbered), path, extra)


def inner_seed(seed: int, fold: int) -> int:
    """The random state of cell (seed, fold)'s inner split: the same for every arm, different per cell."""
    return 7919 * int(seed) + 104729 * (int(fold) + 1)


def inner_split(action: np.ndarray, severity: np.ndarray, seed: int, fold: int) -> np.ndarray:
    """Boolean mask of the inner Valid part of a cell's training actions (stratified on the joint label).

    One part in INNER_FOLDS (fewer parts when there are fewer actions, at least 2), cut by fold_assignment, the
    same stratification helper as the outer folds.
    """
    n_inner = max(2, min(INNER_FOLDS, len(action)))
    return fold_assignment(action, severity, n_inner, inner_seed(seed, fold)) == 0


def fold_bundle(data: DataBundle, n_folds: int, seed: int, fold: int, folder: Path | str) -> DataBundle:
    """The DataBundle of one cell, for nested selection: Train+Valid re-partitioned into k folds; fold `fold` is
    held out as Test (what the cell is scored on); the other folds are split into Train and an inner Valid (what
    the trainer selects its epoch and post-hoc tau on). The original Test is not used by a cell."""
    pooled = [("Train", a) for a in data.train.actions] + [("Valid", a) for a in data.valid.actions]
    action = np.array([a.action for _, a in pooled])
    severity = np.array([a.severity for _, a in pooled])
    assign = fold_assignment(action, severity, n_folds, seed)
    training = np.flatnonzero(assign != fold)
    inner = np.zeros(len(pooled), dtype=bool)
    inner[training] = inner_split(action[training], severity[training], seed, fold)
    where = Path(folder) / f"k{n_folds}" / f"seed{seed}" / f"fold{fold}"
    note = f"seed {seed}, fold {fold} of {n_folds}"
    parts = {}
    for name, mask, what in (("Train", (assign != fold) & ~inner, "inner train"),
                             ("Valid", (assign != fold) & inner, "inner validation (selection)"),
                             ("Test", assign == fold, "held-out fold (scored)")):
        chosen = [pooled[i] for i in np.flatnonzero(mask)]
        parts[name] = _fold_split(name, [a for _, a in chosen], [f"{s}/{a.action_id}" for s, a in chosen],
                                  where / name / "annotations.json", data.root, f"{note}: {what}")
    return dataclasses.replace(data, train=parts["Train"], valid=parts["Valid"], test=parts["Test"])


def prefill_fold_features(cfg: TrainingConfig, data: DataBundle, fold_data: DataBundle) -> None:
    """Frozen mode: write each fold split's feature file by slicing the cached Train/Valid embeddings.

    The feature cache is keyed by a split's exact action list, so every fold split would otherwise run the
    backbone again over clips whose embeddings are already cached; the files written here have the format
    models/features.py reads (feats, view_mask, action_ids) under the key it computes.
    """
    from ..models.features import feature_key, feature_path, load_features

    if cfg.feature_mode != "frozen":
        return
    from ..data.dataset import resolve_frame_size

    cfg = resolve_frame_size(cfg, data)
    pooled = {name: load_features(cfg, split, data.cache, progress=False)
              for name, split in (("Train", data.train), ("Valid", data.valid))}
    index = {name: {aid: i for i, aid in enumerate(fs.action_ids)} for name, fs in pooled.items()}
    for split in (fold_data.train, fold_data.valid, fold_data.test):
        key, _ = feature_key(cfg, split)
        path = feature_path(data.cache, key, split.split)
        if path.is_file():
            continue
        sources = [split.extra["Source"][a.action_id].split("/", 1) for a in split.actions]
        feats = np.stack([pooled[s].feats[index[s][aid]].numpy() for s, aid in sources])
        mask = np.stack([pooled[s].view_mask[index[s][aid]].numpy() for s, aid in sources])
        with atomic_path(path) as tmp:
            np.savez(tmp, feats=feats, view_mask=mask,
                     action_ids=np.array([a.action_id for a in split.actions], dtype=str))


# ---- the cell store (Optuna RDB storage) --------------------------------------------------------------------
class _Heartbeat:
    def __init__(self, storage: Any, trial_id: int) -> None:
        self.storage, self.trial_id = storage, trial_id
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="ab-heartbeat", daemon=True)

    def _beat(self) -> None:
        while True:
            try:
                self.storage.record_heartbeat(self.trial_id)
            except Exception as exc:  # noqa: BLE001 - a lost beat is retried; training goes on
                log.warning("heartbeat failed: %s", exc)
            if self._stop.wait(HEARTBEAT_S):
                return

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


class CellStore:
    """The cells of one experiment as trials of the Optuna study `ab-NAME`."""

    def __init__(self, experiment: Experiment, storage_url: str) -> None:
        import optuna

        self.experiment = experiment
        self.storage = open_storage(storage_url, HEARTBEAT_S, GRACE_S)   # a stale cell's trial FAILs; rerun
        self.study = optuna.create_study(study_name=experiment.study_name, storage=self.storage,
                                         direction="maximize", load_if_exists=True)
        self.study_id = self.storage.get_study_id_from_name(experiment.study_name)
        self.keys = {c.key: c for c in experiment.cells()}

    def _trials(self, states: Iterable[Any] | None = None) -> list[Any]:
        return [t for t in self.study.get_trials(deepcopy=False, states=tuple(states) if states else None)
                if t.user_attrs.get("cell") in self.keys]

    def prepare(self) -> int:
        """Fail stale trials, record the design, enqueue cells not finished, waiting or running. Returns enqueued."""
        from optuna.storages import fail_stale_trials
        from optuna.trial import TrialState

        fail_stale_trials(self.study)
        self.study.set_user_attr("experiment", self.experiment.to_dict())
        self.study.set_user_attr("kind", "ab")
        live = {t.user_attrs["cell"] for t in self._trials((TrialState.COMPLETE, TrialState.WAITING, TrialState.RUNNING))}
        enqueued = 0
        for key, cell in self.keys.items():
            if key not in live:
                self.study.enqueue_trial({}, user_attrs={"cell": key, **dataclasses.asdict(cell)})
                enqueued += 1
        return enqueued

    def claim(self) -> tuple[int, Cell] | None:
        """Atomically move one WAITING cell of this design to RUNNING; None when none is left."""
        from optuna.trial import TrialState

        for t in self._trials((TrialState.WAITING,)):
            tid = self.storage.get_trial_id_from_study_id_trial_number(self.study_id, t.number)
            try:
                if not self.storage.set_trial_state_values(tid, state=TrialState.RUNNING):
                    continue
            except Exception as exc:  # noqa: BLE001 - UpdateFinishedTrialError: another worker finished it
                log.debug("trial %d taken by another worker: %s", t.number, exc)
                continue
            key = t.user_attrs["cell"]
            rivals = [r for r in self._trials((TrialState.COMPLETE, TrialState.RUNNING))
                      if r.user_attrs["cell"] == key and r.number != t.number
                      and (r.state == TrialState.COMPLETE or r.number < t.number)]
            if rivals:  # a duplicate enqueued by a racing worker: the older trial wins
                self.storage.set_trial_user_attr(tid, "duplicate_of", rivals[0].number)
                self.storage.set_trial_state_values(tid, state=TrialState.FAIL)
                continue
            self.storage.set_trial_system_attr(tid, "worker", f"{socket.gethostname()}:{os.getpid()}")
            return tid, self.keys[key]
        return None

    def heartbeat(self, trial_id: int) -> _Heartbeat:
        return _Heartbeat(self.storage, trial_id)

    def complete(self, trial_id: int, value: float, attrs: dict[str, Any]) -> None:
        """Store the cell's results as one user attribute ("result", one write) and mark the trial COMPLETE."""
        from optuna.trial import TrialState

        self.storage.set_trial_user_attr(trial_id, "result", attrs)
        self.storage.set_trial_state_values(trial_id, state=TrialState.COMPLETE, values=[float(value)])

    def fail(self, trial_id: int, error: str) -> None:
        from optuna.trial import TrialState

        self.storage.set_trial_user_attr(trial_id, "error", error[:4000])
        self.storage.set_trial_state_values(trial_id, state=TrialState.FAIL)

    def finished(self) -> dict[str, dict[str, Any]]:
        """cell key -> {arm, seed, fold, ..., the stored result} of its COMPLETE trial (the first, were there two)."""
        from optuna.trial import TrialState

        out: dict[str, dict[str, Any]] = {}
        for t in sorted(self._trials((TrialState.COMPLETE,)), key=lambda t: t.number):
            attrs = dict(t.user_attrs)
            out.setdefault(attrs["cell"], {**attrs.pop("result", {}), **attrs, "trial": t.number})
        return out

    def counts(self) -> dict[str, int]:
        from optuna.trial import TrialState

        states = Counter(t.state.name for t in self._trials())
        done = len(self.finished())
        return {"cells": len(self.keys), "finished": done, "running": states.get(TrialState.RUNNING.name, 0),
                "waiting": states.get(TrialState.WAITING.name, 0), "failed_attempts": states.get("FAIL", 0)}

    def get_attr(self, name: str) -> Any:
        return self.study.user_attrs.get(name)

    def set_attr(self, name: str, value: Any) -> None:
        self.study.set_user_attr(name, value)


# ---- MLflow parent and arm runs -----------------------------------------------------------------------------
def ensure_parent_runs(store: CellStore, tracking_uri: str) -> dict[str, str]:
    """Create (once) the experiment's parent run and one nested run per arm; ids kept in the study."""
    from ..tracking import claim_run, get_or_create_experiment, make_client

    exp = store.experiment
    runs = dict(store.get_attr("mlflow_runs") or {})
    if runs.get("_tracking_uri") == tracking_uri and all(a.name in runs for a in exp.arms) and "_parent" in runs:
        return runs
    client = make_client(tracking_uri)
    exp_id = get_or_create_experiment(client, exp.study_name)
    scope = hashlib.sha1(tracking_uri.encode()).hexdigest()[:10]

    def discard(loser: str) -> None:          # a racing worker claimed first: no orphaned run left RUNNING
        client.set_terminated(loser, status="KILLED")
        client.delete_run(loser)
    if runs.get("_tracking_uri") != tracking_uri or "_parent" not in runs:
        mine = client.create_run(exp_id, run_name=exp.study_name,
                                 tags={"ab_experiment": exp.name, "ab_level": "experiment",
                                       "mlflow.note.content": exp.description}).info.run_id
        winner = claim_run(store.study, f"mlflow_claim:{scope}:_parent", mine, discard)
        if winner == mine:
            client.log_dict(mine, exp.to_dict(), "experiment.json")
        runs = {"_tracking_uri": tracking_uri, "_parent": winner}
    for arm in exp.arms:
        if arm.name not in runs:
            mine = client.create_run(exp_id, run_name=f"{exp.name}:{arm.name}",
                                     tags={"mlflow.parentRunId": runs["_parent"], "ab_experiment": exp.name,
                                           "ab_level": "arm", "ab_arm": arm.name,
                                           "ab_role": "control" if arm.name == exp.control else "treatment"}
                                     ).info.run_id
            winner = claim_run(store.study, f"mlflow_claim:{scope}:{runs['_parent']}:{arm.name}", mine, discard)
            if winner == mine:
                client.log_dict(mine, {"overrides": arm.overrides, "seed_offset": arm.seed_offset,
                                       "config": exp.config(arm.name, 0).flat()}, "arm.json")
            runs[arm.name] = winner
    store.set_attr("mlflow_runs", runs)
    return runs


# ---- one cell -----------------------------------------------------------------------------------------------
def cell_dir(out: Path, cell: Cell) -> Path:
    return Path(out) / "cells" / f"{cell.arm}-{cell.config_hash}" / f"k{cell.folds}_seed{cell.seed}_fold{cell.fold}"


def cell_attrs(result: RunResult, scored: Any, efficiency: Mapping[str, float]) -> dict[str, Any]:
    """What the verdicts and the report need from one finished cell (JSON, a few KB).

    `scored`: the held-out fold's DetailedMetrics of the deployed predictions (scored_record); `result.best`:
    the epoch the trainer selected on the inner Valid; `efficiency`: the cell's `system/...` metrics.
    """
    selected = result.best
    keep = set(quality_metrics()) | {metric_name(SCORED, "loss")}
    metrics = {k: float(v) for k, v in scored.to_mlflow().items() if k in keep}
    metrics.update({k: float(v) for k, v in efficiency.items() if v is not None and math.isfinite(v)})
    last = result.history[-1]
    scored_dict = scored.to_dict()
    record = {k: scored_dict[k] for k in (
        "epoch", "step", "phase", "leaderboard", "val_loss", "train_loss", "confusion_matrices", "num_samples",
        *(f"{t}_{n}" for t in TASKS for n in ("per_class_recall", "per_class_precision", "per_class_f1",
                                               "macro_recall", "macro_f1", "accuracy", "support")))}
    return {
        "metrics": metrics,
        "best": record,
        "selected": {"epoch": int(selected.step) + 1, "phase": selected.phase,
                     "inner_leaderboard": float(selected.leaderboard), "inner_val_loss": float(selected.val_loss),
                     "taus": {k: float(v) for k, v in (result.taus or {}).items()}},
        "curves": {k: [None if v is None or not math.isfinite(v) else float(v) for v in vals]
                   for k, vals in (last.learning_curves or {}).items()},
        "events": [dict(e, detail={k: str(v) for k, v in (e.get("detail") or {}).items()}) for e in result.events],
        "official": result.official,
        "epochs": len(result.history),
        "variant": result.variant,
        "wall_s": round(float(efficiency.get("system/wall_s", math.nan)), 2),
    }


def scored_record(result: RunResult, bundle: DataBundle) -> Any:
    """DetailedMetrics (split `heldout`) of the held-out fold from the predictions the cell would deploy.

    result.logits["test"] are the trainer's final logits of its Test split, i.e. the held-out fold: the
    selected epoch(s), averaged when the arm ensembles, post-hoc adjusted with the tau chosen on the inner Valid
    when the arm uses it. `heldout/loss` is the plain cross-entropy of those logits, summed over the two tasks.
    """
    from ..evaluation.metrics import compute_detailed_metrics, cross_entropy

    targets = bundle.test.targets()
    logits = {t: np.asarray(result.logits["test"][t], dtype=np.float64) for t in TASKS}
    known = np.all([targets[t] >= 0 for t in TASKS], axis=0)
    logits = {t: v[known] for t, v in logits.items()}
    targets = {t: v[known] for t, v in targets.items()}
    loss = cross_entropy(logits, targets)
    best = result.best
    return compute_detailed_metrics(best.epoch, best.phase, logits, targets, best.train_loss, loss, split=SCORED,
                                    step=best.step, phase_number=best.phase_number)


# ---- per-cell resources -------------------------------------------------------------------------------------
def _rss_mb() -> float | None:
    """Current resident memory of this process (MiB) from /proc/self/statm; None where there is no /proc."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE") / (1024 * 1024)


def _hwm_mb() -> float | None:
    """The kernel's peak resident memory of this process (VmHWM, MiB); None where it is unavailable."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        return None
    return None


class CellResources:
    """Peak memory and wall time of one cell, reset at its start (a context manager).

    Peak RSS: writing "5" to /proc/self/clear_refs resets the kernel's high-water mark (Linux >= 4.0), so VmHWM
    at the end is this cell's peak, exact, however short the spike. Where that is refused, a thread samples the
    RSS every `interval` seconds from the start (a peak shorter than that may be missed); without /proc, the
    process's lifetime peak (getrusage) is all there is, and `rss_method` says so. On a GPU, torch's peak
    allocated memory is reset too (`system/cuda_max_mb`).
    """

    def __init__(self, interval: float = 0.05) -> None:
        self.interval = interval
        self.rss_method = ""
        self.values: dict[str, float] = {}
        self._samples: list[float] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._cuda = False

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            rss = _rss_mb()
            if rss is not None:
                self._samples.append(rss)

    def __enter__(self) -> Self:
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.rss_method = "hwm" if _hwm_mb() is not None else ""
        except OSError:
            self.rss_method = ""
        if not self.rss_method:
            if _rss_mb() is not None:
                self.rss_method = "sampled"
                self._samples = [_rss_mb() or 0.0]
                self._thread = threading.Thread(target=self._sample, name="cell-rss", daemon=True)
                self._thread.start()
            else:
                self.rss_method = "lifetime"
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.reset_peak_memory_stats()
            self._cuda = True
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        wall = time.perf_counter() - self._t0
        if self.rss_method == "hwm":
            peak = _hwm_mb()
        elif self.rss_method == "sampled":
            self._stop.set()
            if self._thread is not None:
                self._thread.join(1)
            peak = max(self._samples + [_rss_mb() or 0.0])
        else:
            import resource

            raw = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            peak = raw / (1024 * 1024) if sys.platform == "darwin" else raw / 1024
        self.values = {"system/wall_s": wall, "system/peak_rss_mb": float(peak or math.nan)}
        torch = sys.modules.get("torch")   # CUDA started inside the cell: its peak is the cell's anyway
        if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
            self.values["system/cuda_max_mb"] = torch.cuda.max_memory_allocated() / (1024 * 1024)


def warm_inputs(cfg: TrainingConfig, data: DataBundle, bundle: DataBundle) -> None:
    """Build the inputs cells share before a cell's clock starts: the learned representation of its Train
    (feature_mode=learned) and the cached embeddings of its splits (learned / frozen). They are cached on disk by
    content, so whichever arm reached a (seed, fold) first would otherwise pay for every arm, and `system/wall_s`
    / `system/peak_rss_mb` would measure the order of the cells. With them built here, the efficiency metrics
    are the cost of training and predicting given cached inputs (the one-off representation and feature cost of
    an arm is in its log). Frozen embeddings of the fold splits are sliced from the pooled splits' cached ones
    (prefill_fold_features). End-to-end cells have nothing to warm."""
    if cfg.feature_mode == "end_to_end":
        return
    try:
        from ..models.features import load_features
        from ..training.sources import feature_config
    except ImportError as exc:   # a trainer without this interface: the trainer builds them, inside the clock
        log.warning("cannot warm the cell's inputs (%s); efficiency metrics include building them", exc)
        prefill_fold_features(cfg, data, bundle)
        return
    feat_cfg, _ = feature_config(cfg, bundle, progress=False)
    prefill_fold_features(feat_cfg, data, bundle)
    for split in (bundle.train, bundle.valid, bundle.test):
        load_features(feat_cfg, split, bundle.cache, progress=False)


def run_cell(experiment: Experiment, cell: Cell, data: DataBundle, out: Path, tracking_uri: str | None,
             arm_run_id: str | None) -> tuple[float, dict[str, Any]]:
    """Train one cell (resuming from its folder's checkpoint) and return (held-out leaderboard, attributes)."""
    from ..fsutil import claim_run_folder
    from ..training.trainer import Trainer

    cfg = experiment.config(cell.arm, cell.seed)
    folder = claim_run_folder(cell_dir(out, cell), "ab-cell")   # marked before the MLflow run id is written there
    tracker = sink = None
    sinks: list[Any] = []
    if tracking_uri:
        from ..tracking import MLflowSink, RunTracker

        id_file = folder / "mlflow_run_id"
        previous = id_file.read_text().strip() if id_file.is_file() else None
        tracker = RunTracker(tracking_uri, experiment.study_name,
                             run_name=f"{cell.arm} seed{cell.seed} fold{cell.fold}",
                             tags={"ab_experiment": experiment.name, "ab_level": "cell", "ab_arm": cell.arm,
                                   "ab_seed": cell.seed, "ab_fold": cell.fold, "ab_cell": cell.key,
                                   "variant": cfg.variant},
                             parent_run_id=arm_run_id, run_dir=folder, resume_run_id=previous)
        if not previous:
            tracker.log_params(cfg.flat())
        run_id = tracker.wait_run_id(30)
        if run_id:
            atomic_write(id_file, run_id)
        sink = MLflowSink(tracker)
        sinks.append(sink)
    try:
        bundle = fold_bundle(data, cell.folds, cell.seed, cell.fold, Path(out) / "folds")
        warm_inputs(cfg, data, bundle)          # shared, cached inputs are built before the clock starts
        with CellResources() as resources:
            result = Trainer(cfg, bundle, sinks, run_dir=folder, resume=True).run()
    except BaseException as exc:
        if tracker is not None:
            tracker.end("FAILED", error=exc, flush_timeout=30)
        raise
    scored = scored_record(result, bundle)
    attrs = cell_attrs(result, scored, resources.values)
    attrs["rss_method"] = resources.rss_method
    attrs["run_dir"] = str(folder)
    if tracker is not None:
        sink.log_result(result)
        tracker.log_metrics({k: v for k, v in attrs["metrics"].items() if math.isfinite(v)}, step=int(scored.step))
        tracker.end("FINISHED")
        attrs["mlflow_run_id"] = tracker.run_id
    return float(scored.leaderboard), attrs


# ---- a worker -----------------------------------------------------------------------------------------------
@dataclass
class WorkerSummary:
    ran: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)


def run_worker(experiment: Experiment, storage_url: str = DEFAULT_STORAGE, tracking_uri: str | None = None,
               out: Path | str | None = None, max_cells: int | None = None, data: DataBundle = None,
               echo=print) -> WorkerSummary:
    """Enqueue what is missing, then claim and run cells until none is waiting (or max_cells ran)."""
    out = Path(out or Path("runs") / "ab" / experiment.name)
    store = CellStore(experiment, storage_url)
    enqueued = store.prepare()
    counts = store.counts()
    echo(f"[ab] {experiment.study_name}: {counts['cells']} cells ({len(experiment.arms)} arms x {experiment.seeds} "
         f"seeds x {experiment.folds} folds); {counts['finished']} finished, {enqueued} enqueued now, "
         f"{counts['running']} running elsewhere")
    runs = ensure_parent_runs(store, tracking_uri) if tracking_uri else {}
    summary = WorkerSummary()
    while max_cells is None or len(summary.ran) + len(summary.failed) < max_cells:
        claimed = store.claim()
        if claimed is None:
            break
        trial_id, cell = claimed
        if data is None:
            from ..data import load_data

            data = load_data(experiment.base.replace(**experiment.final))   # --set data_root=... counts
        echo(f"[ab] cell {cell.key} ...")
        with store.heartbeat(trial_id):
            try:
                value, attrs = run_cell(experiment, cell, data, out, tracking_uri, runs.get(cell.arm))
            except KeyboardInterrupt:
                store.fail(trial_id, "KeyboardInterrupt")
                raise
            except Exception as exc:  # noqa: BLE001 - recorded; the cell is retried by the next invocation
                store.fail(trial_id, f"{type(exc).__name__}: {exc}")
                summary.failed[cell.key] = f"{type(exc).__name__}: {exc}"
                echo(f"[ab] cell {cell.key} FAILED: {type(exc).__name__}: {exc}")
                continue
        store.complete(trial_id, value, attrs)
        summary.ran.append(cell.key)
        echo(f"[ab] cell {cell.key}: held-out leaderboard {value:.4f} ({attrs['epochs']} epochs, "
             f"{attrs['wall_s']:.1f}s)")
    summary.counts = store.counts()
    return summary


# ---- results and verdicts -----------------------------------------------------------------------------------
def results_table(experiment: Experiment, finished: dict[str, dict[str, Any]]):
    """pandas DataFrame: one row per finished cell (arm, seed, fold, value of every verdict metric)."""
    import pandas as pd

    rows = []
    for key, a in finished.items():
        row = {"arm": a["arm"], "seed": a["seed"], "fold": a["fold"], "cell": key}
        row.update({m: a.get("metrics", {}).get(m, math.nan) for m in verdict_metrics()})
        row["epochs"] = a.get("epochs")
        row["selected_epoch"] = (a.get("selected") or {}).get("epoch")
        rows.append(row)
    columns = ["arm", "seed", "fold", "cell", *verdict_metrics(), "epochs", "selected_epoch"]
    return pd.DataFrame(rows, columns=columns).sort_values(["arm", "seed", "fold"]).reset_index(drop=True)


def cells_long(table, metrics: Sequence[str] | None = None):
    """The long table `arm,seed,fold,metric,value` of a results table (missing values left out): the format
    `ab analyze --cells` reads, written by the runner as cells.csv."""
    import pandas as pd

    metrics = [m for m in (metrics or verdict_metrics()) if m in table.columns]
    long = table.melt(id_vars=["arm", "seed", "fold"], value_vars=metrics, var_name="metric", value_name="value")
    long = long[long.value.notna()]
    order = {m: i for i, m in enumerate(metrics)}
    long = long.assign(_m=long.metric.map(order)).sort_values(["arm", "_m", "seed", "fold"], kind="stable")
    return pd.DataFrame(long[list(CELL_COLUMNS)]).reset_index(drop=True)


def _where(source: str | Path, message: str, fix: str) -> AnalysisError:
    return AnalysisError(located(source, message, fix))


def load_cells(path: str | Path):
    """Read and check a long CSV of cells (`arm,seed,fold,metric,value`); AnalysisError names what is wrong."""
    import pandas as pd

    p = Path(path)
    header = ",".join(CELL_COLUMNS)
    if not p.is_file():
        raise _where(p, "file not found", f"pass a CSV with the header {header} (one row per cell and metric)")
    try:
        frame = pd.read_csv(p, dtype=str, keep_default_na=False, skipinitialspace=True)
    except pd.errors.EmptyDataError:
        raise _where(p, "the file is empty", f"write the header {header} and one row per cell and metric") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise _where(p, f"not a readable CSV ({str(exc).strip()})", "write plain comma-separated UTF-8 text") from None
    frame.columns = [str(c).strip().lower() for c in frame.columns]
    return check_cells(frame, p)


def check_cells(frame, source: str | Path = "cells"):
    """Validate a frame of cells (columns arm, seed, fold, metric, value; values may be text) and return it with
    `value` as float and arm/seed/fold/metric as stripped text. Blank or 'nan' values count as missing."""
    import pandas as pd

    header = ",".join(CELL_COLUMNS)
    missing = [c for c in CELL_COLUMNS if c not in frame.columns]
    if missing:
        raise _where(source, f"missing column{'s' if len(missing) > 1 else ''} {', '.join(missing)} "
                     f"(found: {', '.join(map(str, frame.columns)) or 'none'})",
                     f"use the header {header}: one row per (arm, seed, fold, metric)")
    frame = frame[list(CELL_COLUMNS)].copy()
    if frame.empty:
        raise _where(source, "no rows under the header", "add one row per (arm, seed, fold, metric)")
    for c in ("arm", "seed", "fold", "metric"):
        frame[c] = frame[c].astype(str).str.strip()
        empty = frame.index[frame[c].isin(["", "nan", "None"])]
        if len(empty):
            raise _where(source, f"empty {c} on line{'s' if len(empty) > 1 else ''} {_lines(empty)}",
                         f"give every row its {c}")
    if pd.api.types.is_numeric_dtype(frame["value"]):     # a frame built in Python (the runner's cells)
        value = frame["value"].astype(float)
        text, blank = value.astype(str), value.isna()
    else:                                                  # text from a CSV
        text = frame["value"].astype(str).str.strip()
        value = pd.to_numeric(text, errors="coerce")
        blank = text.str.lower().isin(["", "nan", "na", "none", "null"])
    bad = frame.index[(value.isna() & ~blank) | np.isinf(value.fillna(0.0))]
    if len(bad):
        shown = ", ".join(f"line {i + 2}: {text[i]!r}" for i in bad[:5])
        raise _where(source, f"{len(bad)} non-numeric value{'s' if len(bad) > 1 else ''} ({shown}"
                     f"{', ...' if len(bad) > 5 else ''})",
                     "write each value as a finite number (a blank value marks a missing one)")
    frame["value"] = value.astype(float)
    frame = frame[frame.value.notna()]
    dup = frame.duplicated(["arm", "seed", "fold", "metric"], keep=False)
    if dup.any():
        rows = frame[dup].drop_duplicates(["arm", "seed", "fold", "metric"]).head(5)
        listed = "; ".join(f"{r.arm} seed {r.seed} fold {r.fold} {r.metric}" for r in rows.itertuples())
        raise _where(source, f"{int(dup.sum())} rows repeat an (arm, seed, fold, metric): {listed}",
                     "keep one value per cell and metric (average repeats before, if that is what you mean)")
    return frame.reset_index(drop=True)


def _lines(index) -> str:
    shown = ", ".join(str(i + 2) for i in list(index)[:5])
    return shown + (", ..." if len(index) > 5 else "")


def _key_text(seed: str, fold: str) -> str:
    return f"seed {seed} fold {fold}"


def analyze_cells(cells, control: str, folds: int | None = None, alpha: float = 0.05, power: float = 0.8,
                  strict: bool = True, arms: Sequence[str] | None = None,
                  source: str | Path = "cells") -> list[stats.MetricComparison]:
    """Verdicts from a long table of cells: every arm against `control`, per metric, paired by (seed, fold).

    The one analysis behind both `ab --experiment` and `ab analyze`. folds: k of the variance correction
    (default: the number of distinct folds in the table). strict (ab analyze): every cell of an arm must have a
    partner in the control, else AnalysisError lists the unpaired ones; not strict (a partial experiment): only
    the pairs both arms have are used. arms: the treatment arms and their order (default: as they appear).
    """
    cells = check_cells(cells, source)
    present = list(dict.fromkeys(cells.arm))
    if control not in present:
        raise _where(source, f"the control arm {control!r} is absent (arms: {', '.join(present)})",
                     f"pass --control with one of: {', '.join(present)}")
    treatments = [a for a in (arms or present) if a != control]
    absent = [a for a in treatments if a not in present]
    if absent or not treatments:
        what = f"arm{'s' if len(absent) > 1 else ''} {', '.join(map(repr, absent))} absent" if absent else \
            f"only the control arm {control!r} is present"
        raise _where(source, what, "add the cells of every arm to compare with the control (same seeds and folds)")
    n_folds = cells.fold.nunique()
    if folds is None:
        folds = n_folds
    if folds < 2:
        raise _where(source, f"fewer than 2 folds (k = {folds})",
                     "the corrected test needs k-fold cells with k >= 2: run at least 2 folds per seed")
    if folds < n_folds:
        raise _where(source, f"--folds {folds} but the table holds {n_folds} distinct folds",
                     f"pass --folds {n_folds} or more (or leave it out)")
    if not 0 < alpha < 1:
        raise _where(source, f"alpha {alpha} is not between 0 and 1", "pass --alpha 0.05, for example")
    metrics = list(dict.fromkeys(cells.metric))
    values = {arm: {m: dict(zip(zip(g.seed, g.fold), g.value)) for m, g in cells[cells.arm == arm].groupby("metric")}
              for arm in [control, *treatments]}
    if strict:
        unpaired = []
        for arm in treatments:
            for m in metrics:
                a, b = values[control].get(m, {}), values[arm].get(m, {})
                unpaired += [f"{arm} lacks {_key_text(*k)} of {m}" for k in a if k not in b]
                unpaired += [f"{control} lacks {_key_text(*k)} of {m} (which {arm} has)" for k in b if k not in a]
        if unpaired:
            raise _where(source, f"{len(unpaired)} unpaired cell{'s' if len(unpaired) > 1 else ''}: "
                         + "; ".join(unpaired[:12]) + ("; ..." if len(unpaired) > 12 else ""),
                         "give every arm a value for the same (seed, fold) cells of each metric as the control, "
                         "or drop the unpaired rows")
    out: list[stats.MetricComparison] = []
    for arm in treatments:
        a_vals, b_vals = {}, {}
        for m in metrics:
            a, b = values[control].get(m, {}), values[arm].get(m, {})
            keys = sorted(set(a) & set(b), key=_sort_key)
            if not keys:
                continue
            a_vals[m] = [a[k] for k in keys]
            b_vals[m] = [b[k] for k in keys]
        out += stats.compare(a_vals, b_vals, int(folds), control=control, arm=arm, alpha=alpha, power=power)
    return out


def _sort_key(key: tuple[str, str]) -> tuple:
    return tuple((0, int(v), "") if v.lstrip("-").isdigit() else (1, 0, v) for v in key)


def analyze(experiment: Experiment, table, alpha: float = 0.05, power: float = 0.8) -> list[stats.MetricComparison]:
    """Each treatment arm against the control on every verdict metric (the runner's verdicts: analyze_cells on
    the experiment's cells, k = its folds, pairs both arms finished)."""
    long = cells_long(table)
    if long.empty or not (long.arm == experiment.control).any():
        return []
    arms = [a for a in experiment.treatments if (long.arm == a).any()]
    if not arms:
        return []
    return analyze_cells(long, experiment.control, experiment.folds, alpha, power, strict=False, arms=arms,
                         source=experiment.source or experiment.name)


def verdict_frame(comparisons: Sequence[stats.MetricComparison]):
    import pandas as pd

    columns = [f.name for f in dataclasses.fields(stats.MetricComparison)]
    return pd.DataFrame([c.as_dict() for c in comparisons], columns=columns)


def verdict_records(frame) -> list[dict[str, Any]]:
    """verdicts.json: one object per (arm, metric); NaN and infinite numbers become null (strict JSON)."""
    return [jsonable(row, finite=True) for row in frame.to_dict(orient="records")]


def write_verdicts(out: Path | str, frame) -> dict[str, Path]:
    """verdicts.json (a list of objects) and verdicts.csv under `out`: what both `ab` and `ab analyze` write."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "verdicts.json", "verdicts": out / "verdicts.csv"}
    atomic_write(paths["json"], json.dumps(verdict_records(frame), indent=1))
    frame.to_csv(paths["verdicts"], index=False)
    return paths


def arm_summary(experiment: Experiment, table):
    """Per arm: cells, mean and SD of the primary metric across cells and of the per-seed means (robustness),
    mean wall time and peak memory per cell."""
    import pandas as pd

    rows = []
    for arm in experiment.arms:
        t = table[table.arm == arm.name]
        per_seed = t.groupby("seed")[PRIMARY_METRIC].mean()
        rows.append({"arm": arm.name, "role": "control" if arm.name == experiment.control else "treatment",
                     "cells": len(t), "leaderboard_mean": t[PRIMARY_METRIC].mean(),
                     "leaderboard_sd": t[PRIMARY_METRIC].std(ddof=1),
                     "seed_mean_sd": per_seed.std(ddof=1) if len(per_seed) > 1 else math.nan,
                     "wall_s_mean": t["system/wall_s"].mean(), "peak_rss_mb_mean": t["system/peak_rss_mb"].mean()})
    return pd.DataFrame(rows)


def format_verdicts(frame, metrics: Sequence[str] | None = None) -> str:
    """A plain-text verdict table (what the CLI prints and the README quotes)."""
    if frame.empty:
        return "(no paired cells yet)"
    lines = [(f"{'arm':<16} {'metric':<40} {'A':>8} {'B':>8} {'B-A':>9} {'95% CI':>21} {'p':>7} {'p_adj':>7} "
             f"{'MDE/adj':>15}  verdict")]
    for _, r in frame.iterrows():
        if metrics and r.metric not in metrics:
            continue
        ci = f"[{r.ci_low:+.3f}, {r.ci_high:+.3f}]"
        mde = _fmt_mde(r.mde) + "/" + _fmt_mde(r.mde_adjusted)
        tag = "" if r.family == stats.QUALITY else f" ({r.family}, {r.direction} is better)"
        lines.append(f"{r.arm:<16} {r.metric:<40} {r.mean_a:8.3f} {r.mean_b:8.3f} {r['diff']:+9.3f} {ci:>21} "
                     f"{r.p_value:7.3f} {r.p_adjusted:7.3f} {mde:>15}  {r.verdict}{tag}")
    return "\n".join(lines)


def _fmt_mde(value: float) -> str:
    return f"{value:.3f}" if math.isfinite(value) else ("inf" if value > 0 else "n/a")


def write_results(experiment: Experiment, out: Path | str, table, frame, summary) -> dict[str, Path]:
    """cells.csv (long: the input of `ab analyze`), cells_wide.csv, verdicts.csv / verdicts.json, arms.csv,
    experiment.json (the design)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"cells": out / "cells.csv", "cells_wide": out / "cells_wide.csv", "arms": out / "arms.csv",
             "experiment": out / "experiment.json"}
    cells_long(table).to_csv(paths["cells"], index=False)
    table.to_csv(paths["cells_wide"], index=False)
    summary.to_csv(paths["arms"], index=False)
    atomic_write(paths["experiment"], json.dumps({"experiment": experiment.to_dict(), "metrics": verdict_metrics(),
                                                 "quality_metrics": quality_metrics(), "folds": experiment.folds,
                                                 "test": stats.TEST_NAME}, indent=1))
    paths.update(write_verdicts(out, frame))
    return paths


# ---- the command's steps (cli/ab.py) -----------------------------------------------------------------------
@dataclass(frozen=True)
class RunOptions:
    """How ``python -m mvfouls_ab.ab`` runs an experiment (cli/ab.py)."""
    storage: str = DEFAULT_STORAGE
    tracking_uri: str | None = None     # None: no MLflow
    out: Path | None = None             # default runs/ab/NAME
    workers: int = 1                    # > 1: that many worker processes on this machine
    threads: int = 1                    # torch threads per worker
    max_cells: int | None = None
    worker_only: bool = False           # a child of --workers N: run cells, no verdicts
    worker_argv: tuple[str, ...] = ()   # the command line of a worker child (--workers N)


def run(exp: Experiment, opts: RunOptions, report: Callable[..., Path] | None = None, echo=print) -> int:
    """Run the experiment's cells here (or in opts.workers worker processes), then `finish`. Returns the exit
    code: 0 when every cell finished (or some run elsewhere), 1 when cells failed."""
    out = opts.out or Path("runs") / "ab" / exp.name
    if opts.workers > 1:
        # N independent workers on the same storage; each claims cells until none is waiting.
        CellStore(exp, opts.storage).prepare()     # enqueue once, before the workers race
        if opts.tracking_uri:
            from ..tracking import init_store

            init_store(opts.tracking_uri)                # and create MLflow's tables once, too
        codes = workers.wait_all(workers.start_workers("mvfouls_ab.ab", [list(opts.worker_argv)] * opts.workers))
        if any(codes):
            print(f"[ab] worker exit codes: {codes}", file=sys.stderr)
    else:
        summary = run_worker(exp, opts.storage, opts.tracking_uri, out, opts.max_cells, echo=echo)
        if summary.failed:
            print(f"[ab] {len(summary.failed)} cells failed (rerun the same command to retry them):",
                  file=sys.stderr)
            for key, err in summary.failed.items():
                print(f"  {key}: {err}", file=sys.stderr)
        if opts.worker_only:
            return 1 if summary.failed else 0
    return finish(exp, opts.storage, opts.tracking_uri, out, report)


def finish(exp: Experiment, storage: str, tracking_uri: str | None, out: Path,
           report: Callable[..., Path] | None = None) -> int:
    """Verdicts from whatever is finished; the report (``report``: reporting.report.write_experiment_report) and
    MLflow logging once every cell is."""
    store = CellStore(exp, storage)
    counts = store.counts()
    finished = store.finished()
    table = results_table(exp, finished)
    frame = verdict_frame(analyze(exp, table))
    summary = arm_summary(exp, table)
    paths = write_results(exp, out, table, frame, summary)
    complete = counts["finished"] == counts["cells"]
    state = "complete" if complete else f"PARTIAL: {counts['finished']} of {counts['cells']} cells"
    print(f"\n[ab] {exp.study_name} ({state}); control = {exp.control}")
    print(summary.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print()
    print(format_verdicts(frame))
    print(f"\n[ab] {stats_line(frame)}")
    print(f"[ab] results: {', '.join(str(p) for p in paths.values())}")
    if not complete:
        print(f"[ab] {counts['running']} cells running elsewhere, {counts['waiting']} waiting; "
              "rerun the same command to continue (finished cells are not rerun)")
        return 0 if counts["running"] or counts["waiting"] else 1
    html = None
    if report is not None:
        html = report(exp.name, storage, out / "report.html", tracking_uri=tracking_uri)
        print(f"[ab] report: {html}")
    if tracking_uri:
        log_to_mlflow(store, tracking_uri, paths, frame, html)
    return 0


def log_to_mlflow(store: CellStore, tracking_uri: str, paths: dict[str, Path], frame, html: Path | None) -> None:
    """Verdict files and report on the parent run; per-arm verdict tags; parent and arm runs FINISHED."""
    from ..tracking import make_client

    runs = ensure_parent_runs(store, tracking_uri)
    client = make_client(tracking_uri)
    parent = runs["_parent"]
    for path in paths.values():
        client.log_artifact(parent, str(path), "verdicts")
    if html is not None:
        client.log_artifact(parent, str(html))
    for arm in store.experiment.treatments:
        rows = frame[frame.arm == arm]
        primary = rows[rows.metric == PRIMARY_METRIC]
        if not primary.empty:
            r = primary.iloc[0]
            client.set_tag(runs[arm], "verdict", r.verdict)
            client.set_tag(parent, f"verdict.{arm}", r.verdict)
            client.log_metric(runs[arm], "ab/leaderboard_diff", float(r["diff"]))
            client.log_metric(runs[arm], "ab/leaderboard_p_adjusted", float(r.p_adjusted))
    for name, run_id in runs.items():
        if not name.startswith("_"):
            client.set_terminated(run_id, "FINISHED")
    client.set_terminated(parent, "FINISHED")


def stats_line(frame) -> str:
    if frame.empty:
        return "no comparison"
    r = frame.iloc[0]
    return (f"{r.test}; k = {int(r.folds)} folds, n = {int(frame.n.max())} paired cells; Holm over "
            f"{int((frame[frame.arm == r.arm].family == 'quality').sum())} quality metrics per arm")


def analyze_file(cells: Path | str, control: str, folds: int | None, alpha: float, out: Path | str,
                 power: float = 0.8, report: Callable[..., Path] | None = None):
    """Read CELLS.csv, analyse it (analyze_cells, as the runner does) and write verdicts; ``report``: also the
    HTML report (reporting.report.write_analysis_report)."""
    table = load_cells(cells)
    frame = verdict_frame(analyze_cells(table, control, folds, alpha, power, source=cells))
    paths = write_verdicts(out, frame)
    if report is not None:
        paths["report"] = report(frame, table, Path(out) / "report.html", source=str(cells), alpha=alpha)
    return frame, paths
