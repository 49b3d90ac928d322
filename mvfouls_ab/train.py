"""Train one recipe: python -m mvfouls_ab.train --config experiments/recommended.yaml [--data DIR] [--set k=v ...]

Writes the run folder (--out, default runs/<config name>-seed<seed>): config.yaml, metrics.jsonl, events.jsonl,
checkpoints/ (last.pt every epoch, best model files), predictions_valid.json / predictions_test.json
(/ predictions_chall.json) in the official SoccerNet format, and official_metrics.json (official evaluator numbers
and per-class recall). An existing run folder is resumed from its last checkpoint unless --fresh is given.
Without --data the cached synthetic data set is used. Errors a user can cause print one line and exit 2.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import shutdown
from .config import PROFILES, TrainingConfig, load_config
from .errors import MVFoulsError, located
from .fsutil import atomic_write, check_removable, claim_run_folder, remove_run_folder
from .training.registry import check_registered


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from .cli import HelpFormatter
    from .tracking import DEFAULT_TRACKING_URI

    p = argparse.ArgumentParser(prog="python -m mvfouls_ab.train", description=__doc__.splitlines()[0],
                                epilog=__doc__.split("\n\n", 1)[1], formatter_class=HelpFormatter)
    p.add_argument("--data", default=None, help="MVFouls root (Train/ Valid/ Test/ [Chall/]); default: synthetic set")
    p.add_argument("--config", default=None, help="experiments/NAME.yaml (TrainingConfig overrides)")
    p.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                   help="override TrainingConfig fields: --set a=1 b=2 (repeatable)")
    p.add_argument("--out", default=None, help="run folder (default runs/<config>-seed<seed>)")
    p.add_argument("--profile", choices=sorted(PROFILES), default=None,
                   help="hardware profile applied before the config file: cpu (a small per-frame CNN learned "
                        "on Train), pretrained (frozen Kinetics-400 r2plus1d_18 features on CPU), gpu (fine-tuning "
                        "end to end on CUDA); none: the config's own values")
    p.add_argument("--fresh", action="store_true", help="delete an existing run folder instead of resuming it")
    p.add_argument("--quiet", action="store_true", help="no progress bar (summary lines only)")
    p.add_argument("--tracking-uri", default=DEFAULT_TRACKING_URI,
                   help="MLflow tracking URI (as the study's: http://HOST:5000 for a server)")
    p.add_argument("--experiment", default="mvfouls-train", help="MLflow experiment of the run")
    p.add_argument("--run-name", default=None, help="MLflow run name (default: train-<config>-<variant>-seed<seed>)")
    return p.parse_args(argv)


def build_config(args: argparse.Namespace) -> TrainingConfig:
    base = TrainingConfig().replace(**PROFILES[args.profile]) if args.profile else TrainingConfig()
    cfg = load_config(args.config, args.overrides, base=base)
    changes = {}
    if args.data is not None:
        changes["data_root"] = str(Path(args.data).expanduser().resolve())
    return check_registered(cfg.replace(**changes) if changes else cfg)


RUN_ID_FILE = "mlflow_run.json"      # the run folder's MLflow run: a resumed folder continues the same run


def start_tracking(args: argparse.Namespace, cfg: TrainingConfig, data, out: Path, name: str, plan):
    """The run's MLflow run (created, or the run folder's own when it is resumed), as a trial's: params, tags,
    a sink for the epochs; epochs a killed earlier invocation checkpointed but did not send are backfilled."""
    import json

    from .study import checkpointed_records
    from .tracking import (
        MLflowSink,
        RunTracker,
        check_tracking_uri,
        data_fingerprint,
        git_commit,
        make_client,
    )

    check_tracking_uri(args.tracking_uri)
    out.mkdir(parents=True, exist_ok=True)
    id_file = out / RUN_ID_FILE
    resume = None
    if id_file.is_file():
        saved = json.loads(id_file.read_text())
        if saved.get("tracking_uri") == args.tracking_uri:
            try:
                make_client(args.tracking_uri).get_run(saved["run_id"])
                resume = saved["run_id"]
            except Exception:  # noqa: BLE001 - a deleted run or another store: start a new run
                resume = None
    phase_text = " -> ".join(f"{p.name}({p.epochs})" for p in plan)
    tags = {"role": "train", "config": name, "variant": cfg.variant, "complexity_level": cfg.complexity_level,
            "phase_plan": phase_text, "data_fingerprint": data_fingerprint(data.root), "git_commit": git_commit(),
            "run_dir": str(out.resolve())}
    run_name = args.run_name or f"train-{name}-{cfg.variant}-seed{cfg.seed}"
    tracker = RunTracker(args.tracking_uri, args.experiment, run_name, tags=tags, run_dir=out, resume_run_id=resume)
    if resume:
        tracker.set_tags(tags)
    tracker.log_params(cfg.flat())
    run_id = tracker.wait_run_id(timeout=30.0)
    if run_id:
        atomic_write(id_file, json.dumps({"run_id": run_id, "tracking_uri": args.tracking_uri,
                                          "experiment": args.experiment}))
    sink = MLflowSink(tracker)
    if resume:
        sink.backfill(checkpointed_records(out))
    from .tracking import experiment_url

    uri = args.tracking_uri
    try:
        exp_id = make_client(uri).get_run(run_id).info.experiment_id if run_id else None
    except Exception:  # noqa: BLE001 - informative only
        exp_id = None
    where = (experiment_url(uri, exp_id) if uri.startswith("http")
             else f"mlflow ui --backend-store-uri {uri}, then open {experiment_url('http://127.0.0.1:5000', exp_id)}")
    print(f"MLflow: {where}  (experiment {args.experiment!r}, run {run_name} {run_id or ''})", flush=True)
    return tracker, sink


def finish_tracking(tracker, sink, cfg: TrainingConfig, result, data, out: Path) -> None:
    """What a finished trial logs: the best epoch, prediction files, checkpoint, summary metrics on Valid and
    Test, the targets met, and the run's MLflow model (runs:/<id>/model, and out/mlflow_model)."""
    from . import ranking
    from .modelpack import log_run_model
    from .study import trial_summary

    sink.log_result(result)
    log_run_model(tracker, cfg, result, data, out, step=len(result.history),
                  source={"run_dir": str(out.resolve()), "role": "train"})
    summary = trial_summary(result, data)
    tracker.log_metrics({f"summary/{split}/{k}": v for split, s in summary.items() for k, v in s.items()
                         if isinstance(v, (int, float)) and v is not None}, step=len(result.history))
    passed = ranking.checks(summary["valid"])
    tracker.set_tags({"targets_met_valid": f"{sum(passed.values())}/{len(passed)}",
                      "all_targets_valid": all(passed.values())})
    tracker.end("FINISHED")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = build_config(args)   # config and path errors first, before the heavy imports
        from .tracking import check_tracking_uri

        check_tracking_uri(args.tracking_uri)
        if args.data is not None and not Path(args.data).is_dir():
            raise MVFoulsError(located(args.data, "data folder not found", "pass the folder that holds Train/ "
                                       "Valid/ Test/, or leave --data out to use the synthetic data set"))
        from .data.dataset import load_data, resolve_frame_size
        from .monitoring import ConsoleSink
        from .training.phases import phase_plan
        from .training.trainer import Trainer

        name = Path(args.config).stem if args.config else "default"
        out = Path(args.out) if args.out else Path("runs") / f"{name}-seed{cfg.seed}"
        if args.fresh:               # refuse before anything else: a folder no run made is never deleted
            check_removable(out)
        data = load_data(cfg)        # the inputs are validated before anything is deleted
        cfg = resolve_frame_size(cfg, data)   # frame_size 0: the clips' native size
        if args.fresh:
            remove_run_folder(out)
        claim_run_folder(out)
        plan = phase_plan(cfg)
        sink = ConsoleSink(total_epochs=sum(p.epochs for p in plan), file=sys.stdout, progress=not args.quiet,
                           phase_epochs={p.name: p.epochs for p in plan})
        print(f"run folder {out} | data {data.root} | variant {cfg.variant} | {cfg.feature_mode} {cfg.backbone} | "
              f"phases {' -> '.join(f'{p.name}({p.epochs})' for p in plan)}", flush=True)
        tracker, mlflow_sink = start_tracking(args, cfg, data, out, name, plan)
        try:
            result = Trainer(cfg, data, [sink, mlflow_sink, shutdown.StopSink()], out).run()
        except BaseException as exc:
            tracker.end("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED", exc, flush_timeout=10.0)
            raise
        finish_tracking(tracker, mlflow_sink, cfg, result, data, out)
        if result.extras.get("representation", {}).get("computed"):   # the stage ran here: its own MLflow run
            from .training.representation import learned_representation, log_representation_run

            log_representation_run(learned_representation(cfg, data), args.tracking_uri, args.experiment)
    except MVFoulsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except shutdown.GracefulStop:
        print(f"\nstopped: the last finished epoch is checkpointed in {out}; the same command resumes it",
              file=sys.stderr)
        return shutdown.exit_code()
    best = result.best
    print(f"best epoch {best.step + 1} ({best.phase}) val leaderboard {100 * best.leaderboard:.1f}% | "
          f"post-hoc tau action {result.taus['action']:.2f} severity {result.taus['severity']:.2f}")
    for split, metrics in result.official.items():
        recalls = result.per_class_recall[split]
        print(f"{split}: official leaderboard {metrics['leaderboard_value']:.2f} | "
              f"BA action {metrics['balanced_accuracy_action']:.2f} severity "
              f"{metrics['balanced_accuracy_offence_severity']:.2f} | recall per class action "
              f"{' '.join(f'{100 * r:.0f}' for r in recalls['action'])} | severity "
              f"{' '.join(f'{100 * r:.0f}' for r in recalls['severity'])}")
    print("parameters: " + ", ".join(f"{k} {v:,}" for k, v in result.parameters.items()))
    print(f"predictions: {', '.join(str(p) for p in result.predictions.values())}")
    return 0


if __name__ == "__main__":
    shutdown.install()          # SIGTERM / SIGINT: stop after the current epoch's checkpoint; twice: at once
    sys.exit(main())
