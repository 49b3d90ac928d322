"""The Optuna study, the product's main job: ``python -m mvfouls_ab.study --trials 50`` (cli/study.py).

Each trial: TrainingConfig = profile <- search space ``fixed`` <- suggested ``params``; the three-phase Trainer runs
with three sinks (MLflow child run, Optuna pruning, console line); the objective is the official leaderboard value
(percent) on Valid scored from the trial's official prediction file. The design's targets are Optuna constraints
(``trial.set_constraint`` per target, Optuna 5's replacement of ``TPESampler(constraints_func=...)``; each trial also
stores its Valid/Test summary in the ``summary`` user attribute), so TPE treats trials that miss a target as
infeasible (ranked by how far they miss) and models the good region from feasible, high-leaderboard trials.
``trial.report`` every epoch (the leaderboard in percent) drives the pruner (median | hyperband | none).

Storage: ``--storage`` defaults to ``sqlite:///optuna.db`` (working directory). Every RDB storage gets a heartbeat
(``--heartbeat`` seconds, grace period 2x) with ``RetryHeartbeatStaleTrialCallback`` (the Optuna 5 name of
``RetryFailedTrialCallback``): a worker killed mid-trial leaves a trial whose heartbeat stops; the next worker that
starts a trial marks it FAIL and enqueues a retry with the same parameters. The retry finds the original's run
folder (``<out>/<study>/trial_<original number>``, from ``retry_history``) and its MLflow run (inherited user
attribute), so the Trainer resumes from that trial's last epoch checkpoint and logging continues in the same run.

Workers: start the same command with the same ``--study-name`` and ``--storage`` on several machines or shells, or
pass ``--workers N`` to start N processes here (torch threads per worker = cores // N unless ``--threads``).
``--trials`` counts the trials of this invocation across all its workers (finished = COMPLETE or PRUNED); a
running worker finishes its current trial, so a few more may finish. Use PostgreSQL (``postgresql://...``) for many
workers; SQLite works for one or two on one machine.

At the end the ranking (ranking.py) is printed, saved as CSV and logged with Optuna's plots (history, parameter
importances, parallel coordinates) to the study's MLflow parent run, and the commands to look further are printed.
Errors a user can cause (unknown search-space keys, malformed or unreachable storage, bad tracking URI) print one
``StudyError`` line and exit 2.
"""
from __future__ import annotations

import contextlib
import logging
import os
import socket
import subprocess
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import shutdown
from ..config import PROFILES, TrainingConfig
from ..errors import ConfigError, MVFoulsError, StudyError, located
from ..fsutil import claim_run_folder, remove_run_folder
from ..tracking import (
    DEFAULT_TRACKING_URI,
    SPILL_NAME,
    MLflowSink,
    RunTracker,
    check_tracking_uri,
    claim_run,
    data_fingerprint,
    git_commit,
    wait_closed,
)
from ..tracking.sinks import checkpointed_records
from ..urls import STORAGE_ENV, TRACKING_ENV, redact, redact_text
from . import ranking, workers
from .search_space import default_file, load_search_space, max_epochs, suggest
from .storage import DEFAULT_STORAGE, check_storage_url, open_storage
from .train import log_finished_run

if TYPE_CHECKING:
    import optuna
    from optuna.trial import FrozenTrial

    from ..data.dataset import DataBundle


log = logging.getLogger(__name__)

PRUNERS = ("median", "hyperband", "none")


@dataclass(frozen=True)
class StudyConfig:
    """What a study run is asked (cli/study.py builds it from the command line)."""
    trials: int = 50                       # trials to finish in this invocation (all workers)
    timeout: float | None = None           # stop starting new trials after this many seconds
    study_name: str = "mvfouls"            # Optuna study = MLflow experiment name
    storage: str = DEFAULT_STORAGE
    tracking_uri: str = DEFAULT_TRACKING_URI
    data: str | None = None                # MVFouls root; None: the cached synthetic data set
    profile: str = "cpu"
    seed: int = 0
    search_space: str | None = None        # None: the profile's default (search_space.default_file)
    pruner: str = "median"
    workers: int = 1                       # worker processes started by this invocation
    threads: int = 0                       # torch threads per worker (0: leave as is)
    heartbeat: int = 10
    out: str = "runs/studies"
    spill_dir: str | None = None
    set: tuple[str, ...] = ()              # TrainingConfig overrides (KEY=VALUE) for every trial
    quiet: bool = False
    worker_index: int = 0                  # > 0: a worker started by a coordinator (--workers N)
    until: int | None = None               # stop at this many finished trials in total (instead of --trials more)


# ---- Optuna pieces ------------------------------------------------------------------------------------------
def retry_trial(study: optuna.Study, frozen: FrozenTrial, graceful: bool = False, max_retry: int | None = None) -> bool:
    """Enqueue a WAITING copy of a failed trial: same params, user attributes (its run folder and MLflow run id) and
    intermediate values, with the system attributes of Optuna's RetryHeartbeatStaleTrialCallback (``failed_trial``,
    ``retry_history``), so the retry finds the original's run folder (trial_run_dir) and continues its MLflow run.
    ``graceful``: a trial handed back on a stop signal; those retries do not count against ``max_retry`` (workers
    scaled down again and again must not use up a trial's retries). Returns False when past max_retry."""
    import optuna

    system_attrs = {"failed_trial": frozen.number, "retry_history": [], **frozen.system_attrs}
    system_attrs["retry_history"] = [*system_attrs["retry_history"], frozen.number]
    system_attrs["handed_back_retries"] = int(system_attrs.get("handed_back_retries", 0)) + int(graceful)
    if max_retry is not None and max_retry < len(system_attrs["retry_history"]) - system_attrs["handed_back_retries"]:
        return False
    study.add_trial(optuna.trial.create_trial(
        state=optuna.trial.TrialState.WAITING, params=frozen.params, distributions=frozen.distributions,
        user_attrs=frozen.user_attrs, system_attrs=system_attrs, intermediate_values=frozen.intermediate_values))
    return True


class StaleTrialRetry:
    """The RDB heartbeat's stale-trial callback: a dead worker's trial is retried (retry_trial), up to max_retry
    times not counting graceful hand-backs."""

    def __init__(self, max_retry: int | None = 3) -> None:
        self.max_retry = max_retry

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        retry_trial(study, trial, graceful=False, max_retry=self.max_retry)


def hand_back(study: optuna.Study, trial_id: int | None) -> int | None:
    """Give a trial this worker was running back to the study (after a stop signal): it is marked FAIL (if Optuna
    has not done so) and a retry with the same parameters is enqueued, which the next free worker takes first and
    resumes from the trial's last checkpoint in the same MLflow run. Returns the handed-back trial's number, or None
    when there was nothing to hand back (the trial had finished, or is retried already)."""
    from optuna.trial import TrialState

    if trial_id is None:
        return None
    storage = study._storage
    frozen = storage.get_trial(trial_id)
    if frozen.state == TrialState.RUNNING:
        with contextlib.suppress(Exception):       # a worker that saw it stale may have failed it first
            storage.set_trial_state_values(trial_id, state=TrialState.FAIL)
        frozen = storage.get_trial(trial_id)
    if frozen.state != TrialState.FAIL:
        return None
    for t in study.get_trials(deepcopy=False):
        if (t.system_attrs.get("retry_history") or [None])[-1] == frozen.number:
            return None                            # retried already (a stale-heartbeat retry)
    retry_trial(study, frozen, graceful=True)
    return frozen.number


def make_pruner(name: str, max_resource: int):
    import optuna

    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=3)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=2, max_resource=max(max_resource, 3), reduction_factor=3)
    if name == "none":
        return optuna.pruners.NopPruner()
    raise StudyError(located("--pruner", f"unknown pruner {name!r}", f"use one of {', '.join(PRUNERS)}"))


def make_sampler(seed: int, worker: int = 0):
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(seed=seed + 1000 * worker, multivariate=True, group=True,
                                          n_startup_trials=10)


def set_constraints(trial: optuna.Trial, valid: dict[str, Any]) -> None:
    """The design's targets on Valid as Optuna constraints (<= 0 feasible), read by TPESampler's feasibility split."""
    for target, value in zip(ranking.TARGETS, ranking.constraint_values(valid)):
        trial.set_constraint(target.name, value)


class OptunaSink:
    """Sink: reports the Valid leaderboard (percent) every epoch and raises optuna.TrialPruned when told to."""

    def __init__(self, trial: optuna.Trial) -> None:
        self.trial = trial

    def log(self, record: Any) -> None:
        import optuna

        self.trial.report(100.0 * float(record.leaderboard), int(record.step))
        if self.trial.should_prune():
            valid = ranking.record_summary(record)
            self.trial.set_user_attr("summary", {"valid": valid})
            set_constraints(self.trial, valid)
            self.trial.set_user_attr("epochs_done", int(record.step) + 1)
            raise optuna.TrialPruned(f"pruned at epoch {record.step + 1}")

    def close(self) -> None:
        return None


# ---- the objective ------------------------------------------------------------------------------------------
@dataclass
class StudyContext:
    name: str
    base: TrainingConfig
    space: dict[str, Any]
    out: Path
    tracking_uri: str
    parent_run_id: str | None
    data: DataBundle
    fingerprint: str
    commit: str
    quiet: bool = False
    extra_sinks: list[Any] = field(default_factory=list)
    spill_dir: Path | None = None          # MLflow spill files (default: the trial's run folder)
    current_trial: int | None = None       # the trial id this worker runs (handed back on a stop signal)


def trial_run_dir(ctx: StudyContext, trial: optuna.Trial) -> tuple[Path, int | None]:
    """<out>/trial_<n>, where n is the original trial's number for a retried trial (so it finds the checkpoint)."""
    from optuna.storages import RetryHeartbeatStaleTrialCallback

    frozen = trial.study._storage.get_trial(trial._trial_id)   # Optuna 5's Trial does not expose system_attrs
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        history = RetryHeartbeatStaleTrialCallback.retry_history(frozen)
    root = history[0] if history else None
    return ctx.out / f"trial_{(root if root is not None else trial.number):04d}", root


def objective(trial: optuna.Trial, ctx: StudyContext) -> float:
    """One trial: the full trainer with the sampled config, logged to its MLflow child run; returns the Valid
    leaderboard. The run's last sends (metrics, figures, artifacts, status) finish in a closing thread while the
    next trial trains: call `wait_closed()` before reading the run (run() does)."""
    import optuna

    from ..tracking.sinks import ConsoleSink
    from ..training.phases import phase_plan
    from ..training.trainer import Trainer

    ctx.current_trial = trial._trial_id
    cfg = ctx.base.replace(**suggest(trial, ctx.space, ctx.base))
    run_dir, retry_of = trial_run_dir(ctx, trial)
    if retry_of is None and run_dir.exists():   # left over from an earlier study of the same name
        remove_run_folder(run_dir, "a new trial", legacy_ok=True)
    claim_run_folder(run_dir, "trial")
    plan = phase_plan(cfg)
    resume_run = trial.user_attrs.get("mlflow_run_id") if retry_of is not None else None
    superseded = None
    if resume_run and not has_checkpoint(run_dir):
        # this worker cannot see the dead worker's checkpoint (no shared --out): it starts at epoch 0, so it logs
        # to a new run (tagged as the retry of the old one) instead of logging its steps a second time over it
        superseded, resume_run = resume_run, None
    tags = {"optuna.study": ctx.name, "optuna.trial_number": trial.number, "variant": cfg.variant,
            "complexity_level": cfg.complexity_level, "phase_plan": " -> ".join(f"{p.name}({p.epochs})" for p in plan),
            "data_fingerprint": ctx.fingerprint, "git_commit": ctx.commit, "run_dir": str(run_dir)}
    if retry_of is not None:
        tags["retry_of_trial"] = retry_of
    if superseded:
        tags["retry_of_run"] = superseded
    spill = (ctx.spill_dir / ctx.name / run_dir.name / SPILL_NAME) if ctx.spill_dir else None
    tracker = RunTracker(ctx.tracking_uri, ctx.name, f"trial-{trial.number:04d}-{cfg.variant}", tags=tags,
                         parent_run_id=ctx.parent_run_id, run_dir=run_dir, resume_run_id=resume_run,
                         spill_path=spill)
    if superseded:
        _retire_run(tracker, ctx, superseded, trial.number)
    if resume_run:
        tracker.set_tags(tags)
    tracker.log_params(cfg.flat())
    trial.set_user_attr("run_dir", str(run_dir))
    trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
    run_id = tracker.wait_run_id(timeout=5.0)
    if run_id:
        trial.set_user_attr("mlflow_run_id", run_id)
    mlflow_sink = MLflowSink(tracker)
    if retry_of is not None:
        resumed = checkpointed_records(run_dir)
        mlflow_sink.backfill(resumed)
        for rec in resumed:          # the retry carries the whole learning curve (the pruner sees it all)
            if int(rec.step) not in trial.study._storage.get_trial(trial._trial_id).intermediate_values:
                trial.report(100.0 * float(rec.leaderboard), int(rec.step))
    sinks: list[Any] = [mlflow_sink, OptunaSink(trial), *ctx.extra_sinks]
    if not ctx.quiet:
        sinks.append(ConsoleSink(total_epochs=sum(p.epochs for p in plan), file=sys.stdout, progress=False,
                                 phase_epochs={p.name: p.epochs for p in plan}))
    sinks.append(shutdown.StopSink())     # last: a stop signal ends the trial after a checkpointed, logged epoch
    print(f"trial {trial.number}{f' (retry of {retry_of})' if retry_of is not None else ''}: {cfg.variant} | "
          f"{tags['phase_plan']} | loss {cfg.loss} | run folder {run_dir}", flush=True)
    try:
        result = Trainer(cfg, ctx.data, sinks, run_dir, resume=True).run()
    except optuna.TrialPruned:
        tracker.set_tags({"pruned": "true"})
        tracker.end("KILLED", wait=False)         # the run finishes sending while the next trial starts
        _late_run_id(trial, tracker)
        raise
    except KeyboardInterrupt as exc:         # a stop signal (GracefulStop) or a second one: run() hands it back
        graceful = isinstance(exc, shutdown.GracefulStop)
        tracker.set_tags({"stopped": f"{type(exc).__name__}: {exc}"[:500], "handed_back": "true"})
        # KILLED until a retry resumes the run (RUNNING again); what is not sent in time stays in the spill file,
        # which the retry replays first
        tracker.end("KILLED", flush_timeout=10.0 if graceful else 0.5)
        _late_run_id(trial, tracker)
        raise
    except BaseException as exc:
        tracker.end("FAILED", exc, flush_timeout=10.0)
        _late_run_id(trial, tracker)
        raise
    summary = log_finished_run(tracker, mlflow_sink, cfg, result, ctx.data, run_dir,
                               {"study": ctx.name, "trial": trial.number, "run_dir": run_dir,
                                "data_fingerprint": ctx.fingerprint, "git_commit": ctx.commit})
    trial.set_user_attr("summary", summary)
    set_constraints(trial, summary["valid"])
    trial.set_user_attr("epochs_done", len(result.history))
    trial.set_user_attr("predictions", {k: str(v) for k, v in result.predictions.items()})
    trial.set_user_attr("annotations", {"valid": str(ctx.data.valid.annotations_path),
                                        "test": str(ctx.data.test.annotations_path)})
    tracker.end("FINISHED", wait=False)          # the run finishes sending while the next trial starts
    _late_run_id(trial, tracker)
    return float(result.official["valid"]["leaderboard_value"])


def has_checkpoint(run_dir: Path) -> bool:
    """Whether this worker sees the trial's last epoch checkpoint (the Trainer's checkpoints/last.pt)."""
    from ..training import checkpoint

    return (Path(run_dir) / "checkpoints" / checkpoint.LAST).is_file()


def _retire_run(tracker: RunTracker, ctx: StudyContext, old_run_id: str, trial_number: int) -> None:
    """End the run of a retried trial that this worker cannot continue (KILLED, tagged with its successor), sent
    in the background with the same retries as every other operation."""
    old = RunTracker(ctx.tracking_uri, ctx.name, "", resume_run_id=old_run_id, client=tracker.client)
    new_id = tracker.wait_run_id(timeout=5.0)
    old.set_tags({"superseded_by_trial": trial_number, **({"superseded_by_run": new_id} if new_id else {})})
    old.end("KILLED", wait=False)


def _late_run_id(trial: optuna.Trial, tracker: RunTracker) -> None:
    if tracker.run_id and trial.user_attrs.get("mlflow_run_id") != tracker.run_id:
        trial.set_user_attr("mlflow_run_id", tracker.run_id)


# ---- study orchestration ------------------------------------------------------------------------------------
def build_base_config(args: StudyConfig, space: dict[str, Any]) -> TrainingConfig:
    base = TrainingConfig().replace(**PROFILES[args.profile])
    changes: dict[str, Any] = {"seed": args.seed, "threads": args.threads}
    if args.data:
        changes["data_root"] = str(Path(args.data).expanduser().resolve())
    try:
        base = base.replace(**changes)
        if args.set:
            from ..config import load_config

            base = load_config(None, args.set, base=base)
        from ..training.registry import check_registered  # torch: the registries' modules

        check_registered(base.replace(**space["fixed"]))   # validate the fixed part once
    except ConfigError as exc:
        raise StudyError(str(exc)) from None
    return base


def prepare_data(cfg: TrainingConfig, tracking_uri: str | None = None, experiment: str | None = None) -> Any:
    """Load the data once per worker; before any trial (and before other workers): learn the representation
    (feature_mode=learned: once per data set and stage recipe, logged to MLflow as its own run) and compute and
    cache the per-view features."""
    from ..data.dataset import load_data

    data = load_data(cfg)
    from ..data.dataset import resolve_frame_size

    cfg = resolve_frame_size(cfg, data)
    if cfg.feature_mode in ("frozen", "learned"):
        from ..models.features import load_features
        from ..training.sources import feature_config

        feat_cfg, rep = feature_config(cfg, data, progress=True)
        if rep.get("computed") and tracking_uri and experiment:
            from ..training.representation import learned_representation, log_representation_run

            log_representation_run(learned_representation(cfg, data), tracking_uri, experiment)
        for split in data.splits().values():
            load_features(feat_cfg, split, data.cache, progress=True)     # bars: decoding, feature extraction
    return data


def parent_run(study: optuna.Study, args: StudyConfig, ctx_tags: dict[str, Any]) -> RunTracker:
    """The study's parent run: created once and linked from the study's user attrs; joined by later workers."""
    from ..tracking import make_client

    if args.worker_index > 0:     # started by a coordinator: it creates the parent run (and MLflow's tables)
        run_id = wait_for_parent_run(args)
        return RunTracker(args.tracking_uri, study.study_name, "", resume_run_id=run_id)
    client = make_client(args.tracking_uri)
    found = study.user_attrs.get("mlflow_parent_run_id")
    if found:
        if run_exists(client, found, args.tracking_uri):
            return RunTracker(args.tracking_uri, study.study_name, "", resume_run_id=found, client=client)
        log.warning("study %s: parent run %s does not exist in MLflow (deleted); starting a new one",
                    study.study_name, found)
    tracker = RunTracker(args.tracking_uri, study.study_name, f"study-{study.study_name}",
                         tags={**ctx_tags, "role": "study"}, client=client)
    run_id = tracker.wait_run_id(timeout=60.0)
    if not run_id:
        raise StudyError(located("--tracking-uri", f"MLflow at {args.tracking_uri} did not answer in 60 s",
                                 f"start the tracking server, or use the local default {DEFAULT_TRACKING_URI}"))
    def discard(loser: str) -> None:      # another worker started at the same time and claimed first
        tracker.end("KILLED")
        client.delete_run(loser)

    # each claims under a key named after what it found (no parent run, or a stale one): racing workers compete
    winner = claim_run(study, f"mlflow_parent_claim:{found or 'none'}", run_id, discard)
    study.set_user_attr("mlflow_parent_run_id", winner)
    study.set_user_attr("mlflow_experiment", study.study_name)
    study.set_user_attr("mlflow_tracking_uri", args.tracking_uri)
    if winner != run_id:
        return RunTracker(args.tracking_uri, study.study_name, "", resume_run_id=winner, client=client)
    return tracker


def run_exists(client: Any, run_id: str, tracking_uri: str, attempts: int = 12) -> bool:
    """False only when MLflow answers that the run does not exist (RESOURCE_DOES_NOT_EXIST) or is deleted. Any other
    error (a timeout, a restarting server) is retried with backoff, then reported as a StudyError: a server that
    does not answer is no reason to start a second parent run."""
    delay, last = 0.5, None
    for _ in range(attempts):
        try:
            return client.get_run(run_id).info.lifecycle_stage != "deleted"
        except Exception as exc:  # noqa: BLE001 - classified below
            if getattr(exc, "error_code", None) == "RESOURCE_DOES_NOT_EXIST":
                return False
            last = exc
        time.sleep(delay)
        delay = min(2 * delay, 8.0)
    raise StudyError(located("--tracking-uri", f"MLflow at {redact(tracking_uri)} did not answer about run {run_id} "
                             f"({type(last).__name__}: {redact_text(str(last), [tracking_uri])[:300]})",
                             "start the tracking server (or wait for it) and run the worker again"))


def wait_for_parent_run(args: StudyConfig) -> str:
    """A worker started by a coordinator (``--workers N``) gets the parent run id on its stdin once the
    coordinator has loaded its data and created the run; an end of input means the coordinator failed first."""
    line = workers.read_handed_over()
    if not line:
        raise StudyError(f"worker {args.worker_index}: the coordinating process ended before it created the "
                         f"study's MLflow parent run; see its error above")
    return line


def log_study_plots(study: optuna.Study, tracker: RunTracker) -> None:
    """Optuna's history, parameter importances and parallel coordinates as plotly HTML on the parent run."""
    import optuna.visualization as vis

    plots = {"optimization_history": vis.plot_optimization_history, "param_importances": vis.plot_param_importances,
             "parallel_coordinate": vis.plot_parallel_coordinate, "intermediate_values": vis.plot_intermediate_values}
    for name, fn in plots.items():
        try:
            tracker.log_figure(fn(study), f"optuna/{name}.html")
        except Exception as exc:  # noqa: BLE001 - e.g. importances need >= 2 completed trials with varying params
            log.info("optuna plot %s skipped: %s", name, exc)


def finished_count(study: optuna.Study) -> int:
    from optuna.trial import TrialState

    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))


def join_study(args: StudyConfig, pruner: Any = None) -> tuple[dict, TrainingConfig, Any, int]:
    """Validate the inputs and open (or create) the Optuna study: (search space, base config, study, until)."""
    import optuna

    space = load_search_space(args.search_space or default_file(args.profile))
    check_tracking_uri(args.tracking_uri)
    check_storage_url(args.storage)
    if args.data and not Path(args.data).is_dir():
        raise StudyError(located(args.data, "data folder not found", "pass the folder with Train/ Valid/ Test/"))
    base = build_base_config(args, space)
    storage = open_storage(args.storage, args.heartbeat, stale_trial_callback=StaleTrialRetry(max_retry=3))
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name=args.study_name, storage=storage, direction="maximize",
                                sampler=make_sampler(args.seed, args.worker_index),
                                pruner=pruner or make_pruner(args.pruner, max_epochs(space, base)),
                                load_if_exists=True)
    until = args.until if args.until is not None else finished_count(study) + args.trials
    return space, base, study, until


def open_study(args: StudyConfig, pruner: Any = None, extra_sinks: list[Any] | None = None,
               joined: tuple[dict, TrainingConfig, Any, int] | None = None
               ) -> tuple[Any, StudyContext, RunTracker, int]:
    """Validate the inputs, open (or join) the study and its MLflow parent run, load the data once.
    ``joined``: what `join_study` returned when the caller opened the Optuna study already."""
    space, base, study, until = joined or join_study(args, pruner)
    out = (Path(args.out) / args.study_name).resolve()
    out.mkdir(parents=True, exist_ok=True)

    data = prepare_data(base, args.tracking_uri, args.study_name)
    from ..data.dataset import resolve_frame_size

    base = resolve_frame_size(base, data)     # frame_size 0: the clips' native size, in every trial's config
    fingerprint, commit = data_fingerprint(data.root), git_commit()
    tracker = parent_run(study, args, {"optuna.study": args.study_name, "optuna.storage": _safe(args.storage),
                                       "data_fingerprint": fingerprint, "git_commit": commit})
    if args.worker_index == 0:
        tracker.log_params({"trials": args.trials, "timeout": args.timeout, "pruner": args.pruner,
                            "sampler": "TPESampler(multivariate, group) + trial.set_constraint", "seed": args.seed,
                            "profile": args.profile, "workers": args.workers, "threads": args.threads,
                            "search_space": str(args.search_space or default_file(args.profile)),
                            "data_root": str(data.root)})
        tracker.log_dict(space, "search_space.json")
        from ..tracking import class_distribution

        dist = class_distribution(data)
        tracker.log_dict(dist, "class_distribution.json")
        tracker.log_plot("class_distribution", "class_distribution.html", dist=dist)
        study.set_user_attr("data_root", str(data.root))
        study.set_user_attr("out", str(out))
    ctx = StudyContext(args.study_name, base, space, out, args.tracking_uri, tracker.run_id, data,
                       fingerprint, commit, quiet=args.quiet, extra_sinks=list(extra_sinks or []),
                       spill_dir=Path(args.spill_dir).resolve() if getattr(args, "spill_dir", None) else None)
    return study, ctx, tracker, until


def run(args: StudyConfig, extra_sinks: list[Any] | None = None) -> dict[str, Any]:
    """The whole study: open it, start extra workers, optimize until the trial budget, rank and report."""
    import optuna

    # The Optuna study (and its tables) exists before the other workers start, so they join rather than race to
    # create it. They start at once and load their data while this process does; each then waits for the
    # parent run id on its stdin (MLflow's tables and the parent run are created here, once).
    joined = join_study(args)
    coordinator = args.worker_index == 0
    procs = (workers.start_workers("mvfouls_ab.study", [worker_argv(args, i, joined[3]) for i in range(1, args.workers)],
                                   env=child_env(args), stdin=True) if coordinator and args.workers > 1 else [])
    try:
        study, ctx, tracker, until = open_study(args, extra_sinks=extra_sinks, joined=joined)
    except BaseException:
        workers.hand_over(procs, None)      # they stop with "the coordinating process ended"
        workers.wait_all(procs)
        raise
    workers.hand_over(procs, tracker.run_id)
    out = ctx.out
    threading.Thread(target=recover_spills, args=(study, ctx), name="spill-recovery", daemon=True).start()
    if coordinator:
        print_where_to_look(study, args, tracker.run_id)

    callbacks = [optuna.study.MaxTrialsCallback(until, states=(optuna.trial.TrialState.COMPLETE,
                                                                optuna.trial.TrialState.PRUNED)),
                 FailureBudget(max(3, args.trials)), TrialLine(until), stop_when_requested]
    t0 = time.time()
    stop = finished_count(study) >= until or shutdown.requested()
    if not stop:
        try:
            study.optimize(lambda t: objective(t, ctx), n_trials=None, timeout=args.timeout, callbacks=callbacks,
                           catch=(MVFoulsError, RuntimeError, ValueError, FloatingPointError), gc_after_trial=True)
        except KeyboardInterrupt:               # GracefulStop after a checkpointed epoch, or a second signal
            stopped(study, ctx, tracker, procs, coordinator)
            raise
    wait_closed()                                     # trial runs still sending (ended with wait=False)
    workers.wait_all(procs)
    elapsed = time.time() - t0
    if shutdown.requested():                          # stopped between trials: nothing to hand back
        stopped(study, ctx, tracker, [], coordinator)
        raise shutdown.GracefulStop("stop requested between trials")
    if not coordinator:
        tracker.logger.close(30.0)
        return {"study": study, "elapsed": elapsed}

    saved = ranking.save_ranking(study, out, tracker)
    saved["champion"] = register_best(study, saved, args, tracker)
    log_study_plots(study, tracker)
    tracker.log_metrics({"study/elapsed_s": elapsed, "study/finished_trials": finished_count(study)})
    tracker.end("FINISHED")
    print_report(study, saved, args, out, elapsed)
    return {"study": study, "elapsed": elapsed, **saved}


def stopped(study: optuna.Study, ctx: StudyContext, tracker: RunTracker, procs: list[subprocess.Popen],
            coordinator: bool) -> None:
    """After a stop signal: hand the current trial back, let the runs and the started workers finish sending."""
    number = None
    with contextlib.suppress(Exception):      # the storage may be what is failing; the heartbeat retry remains
        number = hand_back(study, ctx.current_trial)
    if number is not None:
        print(f"trial {number} handed back to the study: the next free worker resumes it from its last checkpoint",
              file=sys.stderr, flush=True)
    wait_closed(60.0)             # the runs of trials that finished just before (inside compose's grace period)
    workers.wait_all(procs, timeout=120)
    tracker.logger.close(5.0)     # the parent run stays open: other workers (or a later start) carry on with it


def recover_spills(study: optuna.Study, ctx: StudyContext, attempts: int = 60) -> int:
    """Replay the spill files of trials that no worker will touch again (finished, or failed with a finished
    retry): a worker that ended before its last trial's run was fully sent (stopped, or killed while the server was
    down) leaves the rest there, and only a retry of a failed trial would find it. Spills of trials that are still
    running or waiting are left to the worker that takes them. Idempotent (replay_spill); runs in the background.
    Returns the files replayed."""
    from optuna.trial import TrialState

    from ..tracking import make_client, replay_spill

    folders = [ctx.out] + ([ctx.spill_dir / ctx.name] if ctx.spill_dir else [])
    spills = [p for folder in folders for p in sorted(Path(folder).glob(f"trial_*/{SPILL_NAME}"))]
    if not spills:
        return 0
    live = set()
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING)):
        live.add((t.system_attrs.get("retry_history") or [t.number])[0])
    done = 0
    client = make_client(ctx.tracking_uri)
    for path in spills:
        try:
            number = int(path.parent.name.removeprefix("trial_"))
        except ValueError:
            continue
        if number in live:
            continue
        for attempt in range(attempts):
            try:
                replay_spill(path, client=client)
                done += 1
                break
            except FileNotFoundError:
                break
            except Exception as exc:  # noqa: BLE001 - the server is down: try again later
                log.info("replaying %s: %s", path, exc)
                time.sleep(min(30.0, 2.0 ** attempt))
    return done


def stop_when_requested(study: optuna.Study, trial: FrozenTrial) -> None:
    """Optuna callback: after a stop signal, start no new trial."""
    if shutdown.requested():
        study.stop()


class FailureBudget:
    """Optuna callback: stop this worker after `limit` failed trials (a broken setup must not loop forever)."""

    def __init__(self, limit: int) -> None:
        self.limit, self.failed = limit, 0

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        from optuna.trial import TrialState

        if trial.state == TrialState.FAIL:
            self.failed += 1
            if self.failed >= self.limit:
                print(f"{self.failed} trials failed in this worker; stopping (see the MLflow runs' error tags)",
                      file=sys.stderr)
                study.stop()


def child_env(args: StudyConfig) -> dict[str, str]:
    """The environment of a worker child: the storage and tracking URIs in variables when they hold a password."""
    return workers.child_env({STORAGE_ENV: args.storage, TRACKING_ENV: args.tracking_uri})


def worker_argv(args: StudyConfig, index: int, until: int) -> list[str]:
    """Worker ``index`` (1..N-1) of ``--workers N``; this process is worker 0, the coordinator."""
    return [*_child_argv(args), "--worker-index", str(index), "--until", str(until), "--workers", "1",
            "--threads", str(args.threads)]


def _child_argv(args: StudyConfig) -> list[str]:
    from ..urls import password_of

    argv = ["--trials", str(args.trials), "--study-name", args.study_name, "--profile", args.profile,
            "--seed", str(args.seed), "--pruner", args.pruner, "--heartbeat", str(args.heartbeat), "--out", args.out]
    for flag, url in (("--storage", args.storage), ("--tracking-uri", args.tracking_uri)):
        if not password_of(url):                  # one with a password goes through the environment (child_env)
            argv += [flag, url]
    for flag, value in (("--timeout", args.timeout), ("--data", args.data), ("--search-space", args.search_space),
                        ("--spill-dir", args.spill_dir)):
        if value is not None:
            argv += [flag, str(value)]
    for item in args.set:
        argv += ["--set", item]
    if args.quiet:
        argv.append("--quiet")
    return argv


def _safe(url: str) -> str:
    """A URL without its password (for tags and printed commands)."""
    return redact(url)


def _mlflow_command(uri: str, study_name: str) -> str:
    """Where the study's runs table is: the experiment's page on a server, or the `mlflow ui` command and page."""
    from ..tracking import experiment_url, make_client

    try:
        exp = make_client(uri).get_experiment_by_name(study_name)
        exp_id = exp.experiment_id if exp is not None else None
    except Exception:  # noqa: BLE001 - printing where to look must not fail the study
        exp_id = None
    if uri.startswith("http"):
        return f"{experiment_url(_safe(uri), exp_id)}   (experiment {study_name!r})"
    return (f"mlflow ui --backend-store-uri {_safe(uri)}, then open "
            f"{experiment_url('http://127.0.0.1:5000', exp_id)}   (experiment {study_name!r})")


def print_where_to_look(study: optuna.Study, args: StudyConfig, parent_run_id: str | None) -> None:
    """At the start: where the trials can be watched while they run."""
    print(f"study {study.study_name}: {finished_count(study)} finished trials so far; watch it in\n"
          f"  MLflow:  {_mlflow_command(args.tracking_uri, study.study_name)}  parent run {parent_run_id}\n"
          f"  Optuna:  optuna-dashboard {_safe(args.storage)}", flush=True)


class TrialLine:
    """Optuna callback: one line per trial this worker finishes (number, state, value, targets met on Valid, the
    best trial so far in the ranking's order, finished of the total)."""

    def __init__(self, until: int) -> None:
        self.until = until

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        from optuna.trial import TrialState

        valid = (trial.user_attrs.get("summary") or {}).get("valid")
        passed = ranking.checks(valid)
        value = trial.value if trial.value is not None else (
            trial.intermediate_values[max(trial.intermediate_values)] if trial.intermediate_values else None)
        try:
            frame = ranking.leaderboard(study)
            best = ranking.best_trial_number(frame)
            best_text = (f"best trial {best} ({100 * float(frame[frame['trial'] == best].iloc[0]['valid_leaderboard']):.1f})"
                         if best is not None else "best: none yet")
        except Exception:  # noqa: BLE001 - the line is informative only
            best_text = "best: ?"
        state = trial.state.name if isinstance(trial.state, TrialState) else str(trial.state)
        print(f"trial {trial.number} {state} | valid leaderboard {'-' if value is None else f'{value:.1f}'} | "
              f"targets {sum(passed.values())}/{len(passed)} | {best_text} | "
              f"{finished_count(study)}/{self.until} finished", flush=True)


def register_best(study: optuna.Study, saved: dict[str, Any], args: StudyConfig, tracker: Any) -> dict[str, Any] | None:
    """Register the best trial's model (targets met first, the ranking's order) as ``mvfouls-<study>`` in the MLflow
    Model Registry with the alias ``champion``. A registry that cannot be reached is reported, not fatal."""
    from ..modelpack import CHAMPION_ALIAS, register_champion, registered_name
    from ..tracking import make_client

    best = saved.get("best")
    if best is None:
        return None
    trial = study.trials[best]
    run_id = trial.user_attrs.get("mlflow_run_id")
    name = registered_name(study.study_name)
    if not run_id:
        return None
    row = saved["frame"][saved["frame"]["trial"] == best].iloc[0]
    tags = {"study": study.study_name, "trial": best, "valid_leaderboard": f"{float(row['valid_leaderboard']):.4f}",
            "all_targets_valid": bool(row["all_targets"])}
    official = (saved.get("test") or {}).get("summary", {}).get("official") or {}
    if official:
        tags["test_leaderboard"] = f"{official['leaderboard_value']:.2f}"
    try:
        version = register_champion(make_client(args.tracking_uri), name, run_id, tags,
                                    description=f"best trial of study {study.study_name}")
    except Exception as exc:  # noqa: BLE001 - a store without a registry, an unreachable server
        print(f"model registry: could not register trial {best}'s model as {name} ({type(exc).__name__}: {exc})",
              file=sys.stderr)
        return None
    tracker.set_tags({"champion": f"{name} v{version.version}"})
    return {"name": name, "version": str(version.version), "uri": f"models:/{name}@{CHAMPION_ALIAS}",
            "run_id": run_id, "trial": best}


def print_report(study: optuna.Study, saved: dict[str, Any], args: StudyConfig, out: Path, elapsed: float) -> None:
    print(f"\nstudy {study.study_name}: {finished_count(study)} finished trials, {elapsed / 60:.1f} min")
    print(ranking.format_leaderboard(saved["frame"]))
    print(ranking.format_test(saved["test"]))
    print(f"leaderboard CSV: {saved['csv']}")
    print(f"MLflow:  {_mlflow_command(args.tracking_uri, study.study_name)}   "
          f"(parent run {study.user_attrs.get('mlflow_parent_run_id')})")
    print(f"Optuna:  optuna-dashboard {_safe(args.storage)}")
    champion = saved.get("champion")
    if champion:
        print(f"Model:   {champion['uri']} (version {champion['version']}, trial {champion['trial']}); predict with "
              f"python -m mvfouls_ab.predict --model {champion['uri']} --tracking-uri {_safe(args.tracking_uri)} "
              f"--data DATA --split Test --out predictions.json")

