"""Train one recipe: python -m mvfouls_ab.train --config experiments/recommended.yaml [--data DIR] [--set k=v ...]

Writes the run folder (--out, default runs/<config name>-seed<seed>): config.yaml, metrics.jsonl, events.jsonl,
checkpoints/ (last.pt every epoch, best model files), predictions_valid.json / predictions_test.json
(/ predictions_chall.json) in the official SoccerNet format, and official_metrics.json (official evaluator numbers
and per-class recall). An existing run folder is resumed from its last checkpoint unless --fresh is given.
Without --data the cached synthetic data set is used. Errors a user can cause print one line and exit 2.
(argparse -> TrainingConfig + TrainOptions -> orchestration/train.py's train).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .. import shutdown
from ..config import PROFILES, TrainingConfig, load_config
from ..errors import MVFoulsError, located
from ..orchestration.train import TrainOptions, run_folder, train
from ..tracking import DEFAULT_TRACKING_URI, check_tracking_uri
from ..training.registry import check_registered
from . import HelpFormatter, fail, script


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
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
    """profile <- the YAML recipe <- --set overrides <- --data; names checked against the registries."""
    base = TrainingConfig().replace(**PROFILES[args.profile]) if args.profile else TrainingConfig()
    cfg = load_config(args.config, args.overrides, base=base)
    changes = {}
    if args.data is not None:
        changes["data_root"] = str(Path(args.data).expanduser().resolve())
    return check_registered(cfg.replace(**changes) if changes else cfg)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = build_config(args)   # config and path errors first, before the heavy imports
        check_tracking_uri(args.tracking_uri)
        if args.data is not None and not Path(args.data).is_dir():
            raise MVFoulsError(located(args.data, "data folder not found", "pass the folder that holds Train/ "
                                       "Valid/ Test/, or leave --data out to use the synthetic data set"))
        opts = TrainOptions(name=Path(args.config).stem if args.config else "default",
                            out=Path(args.out) if args.out else None, tracking_uri=args.tracking_uri,
                            experiment=args.experiment, run_name=args.run_name, fresh=args.fresh, quiet=args.quiet)
        result = train(cfg, opts)
    except MVFoulsError as exc:
        return fail(exc)
    except shutdown.GracefulStop:
        print(f"\nstopped: the last finished epoch is checkpointed in {run_folder(cfg, opts)}; the same command "
              "resumes it", file=sys.stderr)
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
    script(main, signals=True)  # SIGTERM / SIGINT: stop after the current epoch's checkpoint; twice: at once
