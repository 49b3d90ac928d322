"""Train one recipe: python -m mvfouls_ab.train --config experiments/recommended.yaml [--data DIR] [--set k=v ...]

Writes the run folder (--out, default runs/<config name>-seed<seed>): config.yaml, metrics.jsonl, events.jsonl,
checkpoints/ (last.pt every epoch, best model files), predictions_valid.json / predictions_test.json
(/ predictions_chall.json) in the official SoccerNet format, and official_metrics.json (official evaluator numbers
and per-class recall). An existing run folder is resumed from its last checkpoint unless --fresh is given.
Without --data the cached synthetic data set is used. Errors a user can cause print one line and exit 2.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from .config import PROFILES, TrainingConfig, load_config
from .errors import MVFoulsError, located


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m mvfouls_ab.train", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, help="MVFouls root (Train/ Valid/ Test/ [Chall/]); default: synthetic set")
    p.add_argument("--config", default=None, help="experiments/NAME.yaml (TrainingConfig overrides)")
    p.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                   help="override TrainingConfig fields: --set a=1 b=2 (repeatable)")
    p.add_argument("--out", default=None, help="run folder (default runs/<config>-seed<seed>)")
    p.add_argument("--profile", choices=sorted(PROFILES), default=None,
                   help="hardware profile applied before the config file (cpu: frozen small3d features)")
    p.add_argument("--fresh", action="store_true", help="delete an existing run folder instead of resuming it")
    p.add_argument("--quiet", action="store_true", help="no progress bar (summary lines only)")
    return p.parse_args(argv)


def build_config(args: argparse.Namespace) -> TrainingConfig:
    base = TrainingConfig().replace(**PROFILES[args.profile]) if args.profile else TrainingConfig()
    cfg = load_config(args.config, args.overrides, base=base)
    changes = {}
    if args.data is not None:
        changes["data_root"] = str(Path(args.data).expanduser().resolve())
    return cfg.replace(**changes) if changes else cfg


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = build_config(args)   # config and path errors first, before the heavy imports
        if args.data is not None and not Path(args.data).is_dir():
            raise MVFoulsError(located(args.data, "data folder not found", "pass the folder that holds Train/ "
                                       "Valid/ Test/, or leave --data out to use the synthetic data set"))
        from .data.dataset import load_data
        from .monitoring import ConsoleSink
        from .training.phases import phase_plan
        from .training.trainer import Trainer

        name = Path(args.config).stem if args.config else "default"
        out = Path(args.out) if args.out else Path("runs") / f"{name}-seed{cfg.seed}"
        if args.fresh and out.exists():
            shutil.rmtree(out)
        data = load_data(cfg)
        plan = phase_plan(cfg)
        sink = ConsoleSink(total_epochs=sum(p.epochs for p in plan), file=sys.stdout, progress=not args.quiet,
                           phase_epochs={p.name: p.epochs for p in plan})
        print(f"run folder {out} | data {data.root} | variant {cfg.variant} | {cfg.feature_mode} {cfg.backbone} | "
              f"phases {' -> '.join(f'{p.name}({p.epochs})' for p in plan)}", flush=True)
        result = Trainer(cfg, data, [sink], out).run()
    except MVFoulsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
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
    sys.exit(main())
