"""One run of the three-phase trainer from a TrainingConfig, tracked in MLflow like a study trial (its run folder
resumes from the last checkpoint, and its MLflow run with it). The command is cli/train.py.

Writes the run folder: config.yaml, metrics.jsonl, events.jsonl, checkpoints/ (last.pt every epoch, best model
files), predictions_valid.json / predictions_test.json (/ predictions_chall.json) in the official SoccerNet format,
official_metrics.json, and mlflow_model/ (also logged as the run's model).
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import shutdown
from ..config import TrainingConfig
from ..fsutil import atomic_write, check_removable, claim_run_folder, remove_run_folder
from ..tracking import (
    DEFAULT_TRACKING_URI,
    MLflowSink,
    RunTracker,
    check_tracking_uri,
    data_fingerprint,
    experiment_url,
    git_commit,
    make_client,
)
from ..tracking.sinks import ConsoleSink, checkpointed_records
from . import ranking

if TYPE_CHECKING:
    from ..data.dataset import DataBundle
    from ..training.trainer import RunResult


RUN_ID_FILE = "mlflow_run.json"      # the run folder's MLflow run: a resumed folder continues the same run


@dataclass(frozen=True)
class TrainOptions:
    """How ``python -m mvfouls_ab.train`` runs a config (cli/train.py)."""
    name: str = "default"                   # the recipe's name: run folder, run name, tag
    out: Path | None = None                 # run folder (default runs/<name>-seed<seed>)
    tracking_uri: str = DEFAULT_TRACKING_URI
    experiment: str = "mvfouls-train"       # MLflow experiment of the run
    run_name: str | None = None             # default train-<name>-<variant>-seed<seed>
    fresh: bool = False                     # delete an existing run folder instead of resuming it
    quiet: bool = False                     # no progress bar


def run_folder(cfg: TrainingConfig, opts: TrainOptions) -> Path:
    return Path(opts.out) if opts.out else Path("runs") / f"{opts.name}-seed{cfg.seed}"


def train(cfg: TrainingConfig, opts: TrainOptions) -> RunResult:
    """Load the data, train (resuming the run folder), log everything to MLflow; returns the RunResult."""
    from ..data.dataset import load_data, resolve_frame_size
    from ..training.phases import phase_plan
    from ..training.trainer import Trainer

    check_tracking_uri(opts.tracking_uri)
    out = run_folder(cfg, opts)
    if opts.fresh:               # refuse before anything else: a folder no run made is never deleted
        check_removable(out)
    data = load_data(cfg)        # the inputs are validated before anything is deleted
    cfg = resolve_frame_size(cfg, data)   # frame_size 0: the clips' native size
    if opts.fresh:
        remove_run_folder(out)
    claim_run_folder(out)
    plan = phase_plan(cfg)
    console = ConsoleSink(total_epochs=sum(p.epochs for p in plan), file=sys.stdout,
                                     progress=not opts.quiet, phase_epochs={p.name: p.epochs for p in plan})
    print(f"run folder {out} | data {data.root} | variant {cfg.variant} | {cfg.feature_mode} {cfg.backbone} | "
          f"phases {' -> '.join(f'{p.name}({p.epochs})' for p in plan)}", flush=True)
    tracker, mlflow_sink = start_tracking(opts, cfg, data, out, plan)
    try:
        result = Trainer(cfg, data, [console, mlflow_sink, shutdown.StopSink()], out).run()
    except BaseException as exc:
        tracker.end("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED", exc, flush_timeout=10.0)
        raise
    log_finished_run(tracker, mlflow_sink, cfg, result, data, out, {"run_dir": str(out.resolve()), "role": "train"})
    tracker.end("FINISHED")
    if result.extras.get("representation", {}).get("computed"):   # the stage ran here: its own MLflow run
        from ..training.representation import learned_representation, log_representation_run

        log_representation_run(learned_representation(cfg, data), opts.tracking_uri, opts.experiment)
    return result


def start_tracking(opts: TrainOptions, cfg: TrainingConfig, data: DataBundle, out: Path, plan: Any
                   ) -> tuple[RunTracker, MLflowSink]:
    """The run's MLflow run (created, or the run folder's own when it is resumed), as a trial's: params, tags,
    a sink for the epochs; epochs a killed earlier invocation checkpointed but did not send are backfilled."""
    check_tracking_uri(opts.tracking_uri)
    out.mkdir(parents=True, exist_ok=True)
    id_file = out / RUN_ID_FILE
    resume = None
    if id_file.is_file():
        saved = json.loads(id_file.read_text())
        if saved.get("tracking_uri") == opts.tracking_uri:
            try:
                make_client(opts.tracking_uri).get_run(saved["run_id"])
                resume = saved["run_id"]
            except Exception:  # noqa: BLE001 - a deleted run or another store: start a new run
                resume = None
    phase_text = " -> ".join(f"{p.name}({p.epochs})" for p in plan)
    tags = {"role": "train", "config": opts.name, "variant": cfg.variant, "complexity_level": cfg.complexity_level,
            "phase_plan": phase_text, "data_fingerprint": data_fingerprint(data.root), "git_commit": git_commit(),
            "run_dir": str(out.resolve())}
    run_name = opts.run_name or f"train-{opts.name}-{cfg.variant}-seed{cfg.seed}"
    tracker = RunTracker(opts.tracking_uri, opts.experiment, run_name, tags=tags, run_dir=out, resume_run_id=resume)
    if resume:
        tracker.set_tags(tags)
    tracker.log_params(cfg.flat())
    run_id = tracker.wait_run_id(timeout=30.0)
    if run_id:
        atomic_write(id_file, json.dumps({"run_id": run_id, "tracking_uri": opts.tracking_uri,
                                          "experiment": opts.experiment}))
    sink = MLflowSink(tracker)
    if resume:
        sink.backfill(checkpointed_records(out))
    uri = opts.tracking_uri
    try:
        exp_id = make_client(uri).get_run(run_id).info.experiment_id if run_id else None
    except Exception:  # noqa: BLE001 - informative only
        exp_id = None
    where = (experiment_url(uri, exp_id) if uri.startswith("http")
             else f"mlflow ui --backend-store-uri {uri}, then open {experiment_url('http://127.0.0.1:5000', exp_id)}")
    print(f"MLflow: {where}  (experiment {opts.experiment!r}, run {run_name} {run_id or ''})", flush=True)
    return tracker, sink


def log_finished_run(tracker: RunTracker, sink: MLflowSink, cfg: TrainingConfig, result: RunResult, data: DataBundle,
                     run_dir: Path, source: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """What a finished run logs, a train run's and a study trial's alike: the best epoch, prediction files,
    checkpoint, the run's MLflow model (runs:/<id>/model, and run_dir/mlflow_model), summary metrics on Valid and
    Test and the targets met. Returns the summary (ranking.trial_summary); the caller ends the run."""
    from ..modelpack import log_run_model

    sink.log_result(result)
    log_run_model(tracker, cfg, result, data, run_dir, step=len(result.history), source=source)
    summary = ranking.trial_summary(result, data)
    tracker.log_metrics({f"summary/{split}/{k}": v for split, s in summary.items() for k, v in s.items()
                         if isinstance(v, (int, float)) and v is not None}, step=len(result.history))
    passed = ranking.checks(summary["valid"])
    tracker.set_tags({"targets_met_valid": f"{sum(passed.values())}/{len(passed)}",
                      "all_targets_valid": all(passed.values())})
    return summary
