"""A/B experiments: arms x seeds x cross-validation folds, run resumably through an Optuna storage, then verdicts.

An experiment (experiments/ab_NAME.yaml) is a shared base TrainingConfig and a few arms, each a set of overrides;
the first arm (or `control:`) is the control A, every other arm is a B compared with it (experiments/README in the
YAML files says what each compares). A *cell* is one (arm, seed, fold): train with TrainingConfig(seed=seed) on the
fold's train part and select/evaluate on its held-out part.

Folds: Train+Valid actions are pooled and cut into k stratified folds (sklearn StratifiedKFold on the joint
action x severity label; a combination with fewer than k actions is merged into its action class, then its
severity class, then one "rare" group). The partition is reshuffled per seed (repeated k-fold), and every arm sees
the same partition for a given seed, so cells pair across arms. Test is never touched by the folds (the trainer
still scores it; the report shows it). Each fold's two parts are written as official annotations.json files
(`<out>/folds/k<K>/seed<S>/fold<F>/{Train,Valid}/annotations.json`, actions renumbered 0..n-1, the original
`Split/id` kept in the top-level "Source" map) so the trainer's official metric works on them unchanged.

Storage (resume and parallel workers): cells are trials of the Optuna study `ab-NAME` in the same RDB storage as
the HPO study (default sqlite:///optuna.db; postgresql://... for workers on several machines). Each cell is an
enqueued trial whose user attributes name it (`cell` key = arm/seed/fold/k/config hash); a worker claims a WAITING
trial atomically (RUNNING), keeps a heartbeat while it trains, and stores the cell's metrics, best-epoch record,
learning curves, stability events and official scores as user attributes before marking it COMPLETE (value = the
held-out leaderboard value). A new invocation enqueues only cells that have no COMPLETE, WAITING or RUNNING trial, so
finished cells are never rerun; a worker that died is detected by its stale heartbeat (its trial becomes FAIL) and
its cell is enqueued again, and the trainer resumes it from the cell folder's last checkpoint. Changing an arm's
config changes the config hash, hence the cell keys: stale results are never mixed in.

MLflow: experiment `ab-NAME`; a parent run for the experiment, a nested run per arm, and a nested run per cell under
its arm (the trainer's MLflowSink logs every epoch there). The verdict table and the report go to the parent run.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import socket
import threading
import time
import warnings
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import numpy as np
import yaml

from . import stats
from .config import PROFILES, TrainingConfig, coerce, load_config
from .errors import ConfigError, StudyError, located
from .labels import CLASS_SLUGS, TASKS

log = logging.getLogger(__name__)

DEFAULT_STORAGE = "sqlite:///optuna.db"
PRIMARY_METRIC = "val/leaderboard"
HEARTBEAT_S = 20
GRACE_S = 90
EXPERIMENT_KEYS = {"name", "description", "profile", "base_config", "base", "control", "arms", "seeds", "folds",
                   "epoch_scale"}
ARM_KEYS = {"seed_offset", "description", "config"}   # arm keys that are not TrainingConfig fields
EPOCH_KEYS = ("phase1_epochs", "phase2_epochs", "phase3_epochs")


def verdict_metrics() -> list[str]:
    """The metrics every comparison is judged on (MLflow names of the held-out fold's best epoch)."""
    names = [PRIMARY_METRIC]
    names += [f"val/{task}/macro_recall" for task in TASKS]
    names += [f"val/{task}/macro_f1" for task in TASKS]
    names += [f"val/{task}/recall/{slug}" for task in TASKS for slug in CLASS_SLUGS[task]]
    return names


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
        base.replace(**values)  # validates the combination
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
    """Fold index (0..n_folds-1) of every action: StratifiedKFold, shuffled with `seed`."""
    from sklearn.model_selection import StratifiedKFold

    y = stratification_labels(np.asarray(action), np.asarray(severity), n_folds)
    out = np.full(len(y), -1, dtype=np.int64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "least populated class" on tiny data sets
        splitter = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
        for f, (_, held_out) in enumerate(splitter.split(np.zeros(len(y)), y)):
            out[held_out] = f
    return out


def _fold_split(name: str, actions: list, sources: list[str], path: Path, root: Path, note: str):
    """A SplitAnnotations of re-numbered actions, written as an official annotations.json first."""
    from .data.annotations import SplitAnnotations

    renumbered = [dataclasses.replace(a, action_id=str(i)) for i, a in enumerate(actions)]
    doc = {"Set": name.lower(), "Fold": note, "Number of actions": len(renumbered),
           "Source": {a.action_id: s for a, s in zip(renumbered, sources)},
           "Actions": {a.action_id: {**a.raw, "Clips": [
               {"Url": c.url, "Camera type": c.camera_type, "Timestamp": c.timestamp, "Replay speed": c.replay_speed}
               for c in a.clips]} for a in renumbered}}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    os.replace(tmp, path)
    extra = {k: v for k, v in doc.items() if k != "Actions"}
    return SplitAnnotations(name, root, renumbered, {}, len(renumbered), path, extra)


def fold_bundle(data: Any, n_folds: int, seed: int, fold: int, folder: Path | str) -> Any:
    """The DataBundle of one cell: Train+Valid re-partitioned (fold `fold` held out as Valid), Test untouched."""
    pooled = [("Train", a) for a in data.train.actions] + [("Valid", a) for a in data.valid.actions]
    action = np.array([a.action for _, a in pooled])
    severity = np.array([a.severity for _, a in pooled])
    assign = fold_assignment(action, severity, n_folds, seed)
    where = Path(folder) / f"k{n_folds}" / f"seed{seed}" / f"fold{fold}"
    note = f"seed {seed}, fold {fold} of {n_folds}"
    parts = {}
    for name, mask in (("Train", assign != fold), ("Valid", assign == fold)):
        chosen = [pooled[i] for i in np.flatnonzero(mask)]
        parts[name] = _fold_split(name, [a for _, a in chosen], [f"{s}/{a.action_id}" for s, a in chosen],
                                  where / name / "annotations.json", data.root, note)
    return dataclasses.replace(data, train=parts["Train"], valid=parts["Valid"])


def prefill_fold_features(cfg: TrainingConfig, data: Any, fold_data: Any) -> None:
    """Frozen mode: write each fold split's feature file by slicing the cached Train/Valid embeddings.

    The feature cache is keyed by a split's exact action list, so every fold split would otherwise run the
    backbone again over clips whose embeddings are already cached; the files written here have the format
    models/features.py reads (feats, view_mask, action_ids) under the key it computes.
    """
    from .models.features import feature_key, feature_path, load_features

    if cfg.feature_mode != "frozen":
        return
    pooled = {name: load_features(cfg, split, data.cache, progress=False)
              for name, split in (("Train", data.train), ("Valid", data.valid))}
    index = {name: {aid: i for i, aid in enumerate(fs.action_ids)} for name, fs in pooled.items()}
    for split in (fold_data.train, fold_data.valid):
        key, _ = feature_key(cfg, split)
        path = feature_path(data.cache, key, split.split)
        if path.is_file():
            continue
        sources = [split.extra["Source"][a.action_id].split("/", 1) for a in split.actions]
        feats = np.stack([pooled[s].feats[index[s][aid]].numpy() for s, aid in sources])
        mask = np.stack([pooled[s].view_mask[index[s][aid]].numpy() for s, aid in sources])
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npz")
        np.savez(tmp, feats=feats, view_mask=mask,
                 action_ids=np.array([a.action_id for a in split.actions], dtype=str))
        os.replace(tmp, path)


# ---- the cell store (Optuna RDB storage) --------------------------------------------------------------------
def open_storage(url: str):
    """An Optuna RDBStorage with heartbeats (dead workers' cells are detected and rerun)."""
    import optuna

    if not isinstance(url, str) or "://" not in url:
        raise StudyError(located("--storage", f"{url!r} is not a database URL",
                                 "use sqlite:///optuna.db or postgresql://user@host/db"))
    kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):
        kwargs["engine_kwargs"] = {"connect_args": {"timeout": 60}}
    # heartbeats are "experimental" in Optuna's sense since 2.9; say it once in the docs, not on every call
    warnings.filterwarnings("ignore", message=".*(heartbeat|fail_stale_trials).*",
                            category=optuna.exceptions.ExperimentalWarning)
    try:
        return optuna.storages.RDBStorage(url, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S, **kwargs)
    except Exception as exc:  # noqa: BLE001 - SQLAlchemy raises many kinds; all mean the same to the user
        raise StudyError(located("--storage", f"cannot open {url!r} ({type(exc).__name__}: {exc})",
                                 "check that the database server runs and the URL is right")) from None


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
        self.storage = open_storage(storage_url)
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
    from .tracking import get_or_create_experiment, make_client

    exp = store.experiment
    runs = dict(store.get_attr("mlflow_runs") or {})
    if runs.get("_tracking_uri") == tracking_uri and all(a.name in runs for a in exp.arms) and "_parent" in runs:
        return runs
    client = make_client(tracking_uri)
    exp_id = get_or_create_experiment(client, exp.study_name)
    if runs.get("_tracking_uri") != tracking_uri or "_parent" not in runs:
        parent = client.create_run(exp_id, run_name=exp.study_name,
                                   tags={"ab_experiment": exp.name, "ab_level": "experiment",
                                         "mlflow.note.content": exp.description})
        runs = {"_tracking_uri": tracking_uri, "_parent": parent.info.run_id}
        client.log_dict(parent.info.run_id, exp.to_dict(), "experiment.json")
    for arm in exp.arms:
        if arm.name not in runs:
            run = client.create_run(exp_id, run_name=f"{exp.name}:{arm.name}",
                                    tags={"mlflow.parentRunId": runs["_parent"], "ab_experiment": exp.name,
                                          "ab_level": "arm", "ab_arm": arm.name,
                                          "ab_role": "control" if arm.name == exp.control else "treatment"})
            client.log_dict(run.info.run_id, {"overrides": arm.overrides, "seed_offset": arm.seed_offset,
                                              "config": exp.config(arm.name, 0).flat()}, "arm.json")
            runs[arm.name] = run.info.run_id
    store.set_attr("mlflow_runs", runs)
    return runs


# ---- one cell -----------------------------------------------------------------------------------------------
def cell_dir(out: Path, cell: Cell) -> Path:
    return Path(out) / "cells" / f"{cell.arm}-{cell.config_hash}" / f"k{cell.folds}_seed{cell.seed}_fold{cell.fold}"


def cell_attrs(result: Any, wall_s: float) -> dict[str, Any]:
    """What the verdicts and the report need from one finished cell (JSON, a few KB)."""
    best = result.best
    metrics = best.to_mlflow()
    keep = set(verdict_metrics()) | {"val/loss", "train/loss"}
    last = result.history[-1]
    best_dict = best.to_dict()
    record = {k: best_dict[k] for k in (
        "epoch", "step", "phase", "leaderboard", "val_loss", "train_loss", "confusion_matrices", "num_samples",
        *(f"{t}_{n}" for t in TASKS for n in ("per_class_recall", "per_class_precision", "per_class_f1",
                                               "macro_recall", "macro_f1", "accuracy", "support")))}
    return {
        "metrics": {k: float(v) for k, v in metrics.items() if k in keep},
        "best": record,
        "curves": {k: [None if v is None or not math.isfinite(v) else float(v) for v in vals]
                   for k, vals in (last.learning_curves or {}).items()},
        "events": [dict(e, detail={k: str(v) for k, v in (e.get("detail") or {}).items()}) for e in result.events],
        "official": result.official,
        "epochs": len(result.history),
        "variant": result.variant,
        "wall_s": round(wall_s, 2),
    }


def run_cell(experiment: Experiment, cell: Cell, data: Any, out: Path, tracking_uri: str | None,
             arm_run_id: str | None) -> tuple[float, dict[str, Any]]:
    """Train one cell (resuming from its folder's checkpoint) and return (held-out leaderboard, attributes)."""
    from .training.trainer import Trainer

    cfg = experiment.config(cell.arm, cell.seed)
    folder = cell_dir(out, cell)
    folder.mkdir(parents=True, exist_ok=True)
    bundle = fold_bundle(data, cell.folds, cell.seed, cell.fold, Path(out) / "folds")
    prefill_fold_features(cfg, data, bundle)
    tracker = sink = None
    sinks: list[Any] = []
    if tracking_uri:
        from .tracking import MLflowSink, RunTracker

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
            id_file.write_text(run_id)
        sink = MLflowSink(tracker)
        sinks.append(sink)
    t0 = time.perf_counter()
    try:
        result = Trainer(cfg, bundle, sinks, run_dir=folder, resume=True).run()
    except BaseException as exc:
        if tracker is not None:
            tracker.end("FAILED", error=exc, flush_timeout=30)
        raise
    attrs = cell_attrs(result, time.perf_counter() - t0)
    attrs["run_dir"] = str(folder)
    if tracker is not None:
        sink.log_result(result)
        tracker.end("FINISHED")
        attrs["mlflow_run_id"] = tracker.run_id
    return float(result.best.leaderboard), attrs


# ---- a worker -----------------------------------------------------------------------------------------------
@dataclass
class WorkerSummary:
    ran: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)


def run_worker(experiment: Experiment, storage_url: str = DEFAULT_STORAGE, tracking_uri: str | None = None,
               out: Path | str | None = None, max_cells: int | None = None, data: Any = None,
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
            from .data import load_data

            data = load_data(experiment.base)
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
        row.update({m: a["metrics"].get(m, math.nan) for m in verdict_metrics()})
        test = (a.get("official") or {}).get("test") or {}
        row["test/leaderboard"] = test.get("leaderboard_value", math.nan) / 100.0 if test else math.nan
        row["epochs"] = a.get("epochs")
        row["wall_s"] = a.get("wall_s")
        rows.append(row)
    columns = ["arm", "seed", "fold", "cell", *verdict_metrics(), "test/leaderboard", "epochs", "wall_s"]
    return pd.DataFrame(rows, columns=columns).sort_values(["arm", "seed", "fold"]).reset_index(drop=True)


def analyze(experiment: Experiment, table, alpha: float = 0.05, power: float = 0.8,
            n_resamples: int = 4999) -> list[stats.MetricComparison]:
    """Each treatment arm against the control on every verdict metric, paired by (seed, fold)."""
    control = table[table.arm == experiment.control].set_index(["seed", "fold"])
    out: list[stats.MetricComparison] = []
    for arm in experiment.treatments:
        treat = table[table.arm == arm].set_index(["seed", "fold"])
        pairs = control.index.intersection(treat.index).sort_values()
        if len(pairs) == 0:
            continue
        a = {m: control.loc[pairs, m].to_numpy(float) for m in verdict_metrics()}
        b = {m: treat.loc[pairs, m].to_numpy(float) for m in verdict_metrics()}
        out += stats.compare(a, b, control=experiment.control, arm=arm, alpha=alpha, power=power,
                             n_resamples=n_resamples)
    return out


def verdict_frame(comparisons: Sequence[stats.MetricComparison]):
    import pandas as pd

    return pd.DataFrame([c.as_dict() for c in comparisons])


def arm_summary(experiment: Experiment, table):
    """Per arm: cells, mean and SD of the primary metric across cells and of the per-seed means (robustness)."""
    import pandas as pd

    rows = []
    for arm in experiment.arms:
        t = table[table.arm == arm.name]
        per_seed = t.groupby("seed")[PRIMARY_METRIC].mean()
        rows.append({"arm": arm.name, "role": "control" if arm.name == experiment.control else "treatment",
                     "cells": len(t), "leaderboard_mean": t[PRIMARY_METRIC].mean(),
                     "leaderboard_sd": t[PRIMARY_METRIC].std(ddof=1),
                     "seed_mean_sd": per_seed.std(ddof=1) if len(per_seed) > 1 else math.nan,
                     "test_leaderboard_mean": t["test/leaderboard"].mean(),
                     "wall_s_mean": t["wall_s"].mean()})
    return pd.DataFrame(rows)


def format_verdicts(frame, metrics: Sequence[str] | None = None) -> str:
    """A plain-text verdict table (what the CLI prints and the README quotes)."""
    if frame.empty:
        return "(no paired cells yet)"
    lines = [(f"{'arm':<16} {'metric':<34} {'A':>7} {'B':>7} {'B-A':>8} {'95% CI':>19} {'p':>7} {'p_holm':>7} "
             f"{'MDE/Holm':>13}  verdict")]
    for _, r in frame.iterrows():
        if metrics and r.metric not in metrics:
            continue
        ci = f"[{r.ci_low:+.3f}, {r.ci_high:+.3f}]"
        mde = _fmt_mde(r.mde) + "/" + _fmt_mde(r.mde_holm)
        lines.append(f"{r.arm:<16} {r.metric:<34} {r.mean_a:7.3f} {r.mean_b:7.3f} {r['diff']:+8.3f} {ci:>19} "
                     f"{r.p_value:7.3f} {r.p_holm:7.3f} {mde:>13}  {r.verdict}")
    return "\n".join(lines)


def _fmt_mde(value: float) -> str:
    return f"{value:.3f}" if math.isfinite(value) else ("inf" if value > 0 else "n/a")


def write_results(experiment: Experiment, out: Path | str, table, frame, summary) -> dict[str, Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"cells": out / "cells.csv", "verdicts": out / "verdicts.csv", "arms": out / "arms.csv",
             "json": out / "verdicts.json"}
    table.to_csv(paths["cells"], index=False)
    frame.to_csv(paths["verdicts"], index=False)
    summary.to_csv(paths["arms"], index=False)
    doc = {"experiment": experiment.to_dict(), "metrics": verdict_metrics(),
           "verdicts": json.loads(frame.to_json(orient="records")),
           "arms": json.loads(summary.to_json(orient="records"))}
    paths["json"].write_text(json.dumps(doc, indent=1))
    return paths
