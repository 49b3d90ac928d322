"""``python -m mvfouls_ab.study --trials 50`` (= ``mvfouls-ab study``): the Optuna study, the product's main job.
argparse -> StudyConfig -> orchestration/study.py's run (what a trial does is described there)."""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

from .. import shutdown
from ..config import PROFILES
from ..errors import MVFoulsError
from ..orchestration import study
from ..orchestration.storage import DEFAULT_STORAGE, default_storage
from ..orchestration.study import PRUNERS, StudyConfig
from ..tracking import DEFAULT_TRACKING_URI
from ..urls import STORAGE_ENV, TRACKING_ENV
from . import HelpFormatter, fail, script


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mvfouls_ab.study", description=study.__doc__.splitlines()[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--trials", type=int, default=50, help="trials to finish in this invocation (all workers)")
    p.add_argument("--timeout", type=float, default=None, help="stop starting new trials after this many seconds")
    p.add_argument("--study-name", default="mvfouls", help="Optuna study = MLflow experiment name")
    p.add_argument("--storage", default=default_storage(),
                   help=f"Optuna RDB storage URL (postgresql://... for workers; default ${STORAGE_ENV} or "
                        f"{DEFAULT_STORAGE}: put a URL with a password there, or in ~/.pgpass, not on the command line)")
    p.add_argument("--tracking-uri", default=os.environ.get(TRACKING_ENV) or DEFAULT_TRACKING_URI,
                   help=f"MLflow tracking URI (default ${TRACKING_ENV} or {DEFAULT_TRACKING_URI})")
    p.add_argument("--data", default=None, help="MVFouls root; default: the cached synthetic data set")
    p.add_argument("--profile", choices=sorted(PROFILES), default="cpu", help="hardware profile: cpu (a small per-frame CNN learned on Train, cached "
                   "features), pretrained (frozen Kinetics-400 video-net features on CPU), gpu (fine-tuning end "
                   "to end on CUDA)")
    p.add_argument("--seed", type=int, default=0, help="training seed of every trial and the sampler's seed")
    p.add_argument("--search-space", default=None, help="YAML search space (none: experiments/search_space.yaml; "
                   "--profile gpu: experiments/search_space_gpu.yaml)")
    p.add_argument("--pruner", choices=PRUNERS, default="median", help="Optuna pruner, fed the Valid leaderboard "
                   "every epoch")
    p.add_argument("--workers", type=int, default=1, help="worker processes started by this command")
    p.add_argument("--threads", type=int, default=0, help="torch threads per worker (0: cores // workers)")
    p.add_argument("--heartbeat", type=int, default=10, help="RDB heartbeat seconds (grace period 2x)")
    p.add_argument("--out", default="runs/studies", help="run folders go to OUT/STUDY/trial_NNNN")
    p.add_argument("--spill-dir", default=None,
                   help="MLflow operations not sent yet are kept in SPILL_DIR/STUDY/trial_NNNN/mlflow_spill.jsonl "
                        "while the server is unreachable (default: in the trial's run folder)")
    p.add_argument("--set", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                   help="TrainingConfig override for every trial (repeatable)")
    p.add_argument("--quiet", action="store_true", help="no per-epoch lines")
    # set by a coordinating process for the workers it starts
    p.add_argument("--worker-index", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--until", type=int, default=None,
                   help="stop when the study has this many finished trials in total (instead of --trials more); "
                        "for workers that join or restart independently (docker compose, tracking/stack.py)")
    return p


def parse_args(argv: list[str] | None = None) -> StudyConfig:
    p = build_parser()
    args = p.parse_args(argv)
    if args.trials < 1 or args.workers < 1:
        p.error("--trials and --workers must be >= 1")
    if args.threads <= 0:
        args.threads = max(1, (os.cpu_count() or 1) // args.workers)
    return StudyConfig(**{**vars(args), "set": tuple(args.set)})


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        study.run(args)
    except MVFoulsError as exc:
        return fail(exc)
    except KeyboardInterrupt as exc:
        if shutdown.requested():
            name = signal.Signals(shutdown.signal_received() or signal.SIGINT).name
            print(f"stopped on {name}" + ("" if isinstance(exc, shutdown.GracefulStop) else " (at once)"),
                  file=sys.stderr)
            return shutdown.exit_code()
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    script(main, signals=True)  # SIGTERM / SIGINT: stop after the current epoch's checkpoint; twice: at once
