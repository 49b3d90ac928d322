"""Study throughput: one worker against two workers sharing a PostgreSQL study, on the same fixed trials.

    python benchmarks/study_workers.py [--trials 6] [--epochs 2 3 2] [--pairs 1] [--data DIR]
    python benchmarks/study_workers.py --trials 16 --epochs 8 10 8 --pairs 3    # README figures

For each worker count it creates a fresh PostgreSQL database (127.0.0.1:5432, user postgres), enqueues the same
fixed set of trial parameters, and runs `python -m mvfouls_ab.study --workers N --threads cores//N` to finish them
(MLflow into a PostgreSQL store beside it, as a multi-worker deployment has). Reported: the trials' span in the
storage (first start to last completion) and the command's wall time; the target is a span speedup >= 1.6x with two workers on 2 cores.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import sqlalchemy

ADMIN = "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres"
SPACE = """
fixed: {{num_phases: 3, phase1_epochs: {e1}, phase2_epochs: {e2}, phase3_epochs: {e3}, curriculum: false}}
params:
  variant: {{type: categorical, choices: [simplified, optimized]}}
  phase2_lr: {{type: float, low: 1.0e-3, high: 1.0e-2, log: true}}
"""


def admin(sql: str) -> None:
    engine = sqlalchemy.create_engine(ADMIN, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(sqlalchemy.text(sql))
    engine.dispose()


def _secs(trial) -> float:
    return (trial.datetime_complete - trial.datetime_start).total_seconds()


def run(workers: int, trials: int, space: Path, tmp: Path, data: str | None) -> tuple[float, float]:
    import optuna

    db = f"bench_{uuid.uuid4().hex[:8]}"
    admin(f'CREATE DATABASE "{db}"')
    admin(f'CREATE DATABASE "{db}_mlflow"')
    url = f"postgresql+psycopg2://postgres@127.0.0.1:5432/{db}"
    try:
        study = optuna.create_study(study_name="bench", storage=url, direction="maximize")
        for i in range(trials):
            study.enqueue_trial({"variant": ("simplified", "optimized")[i % 2], "phase2_lr": 10 ** (-3 + i / trials)})
        threads = max(1, (os.cpu_count() or 1) // workers)
        cmd = [sys.executable, "-m", "mvfouls_ab.study", "--trials", str(trials), "--study-name", "bench",
               "--storage", url, "--tracking-uri", f"{url}_mlflow",
               "--search-space", str(space), "--pruner", "none", "--workers", str(workers), "--threads",
               str(threads), "--out", str(tmp / f"runs{workers}"), "--quiet"]
        if data:
            cmd += ["--data", data]
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, cwd=tmp)
        wall = time.perf_counter() - t0
        done = [t for t in optuna.load_study(study_name="bench", storage=url).trials
                if t.state == optuna.trial.TrialState.COMPLETE and t.number < trials]   # the enqueued set
        span = (max(t.datetime_complete for t in done) - min(t.datetime_start for t in done)).total_seconds()
        print(f"{workers} worker(s) x {threads} thread(s): {len(done)} trials, span {span:.1f} s, wall {wall:.1f} s")
        first = min(t.datetime_start for t in done)
        for worker in sorted({t.user_attrs.get("worker", "?") for t in done}):   # each worker's timeline
            mine = sorted((t for t in done if t.user_attrs.get("worker", "?") == worker),
                          key=lambda t: t.datetime_start)
            start = (mine[0].datetime_start - first).total_seconds()
            end = (max(t.datetime_complete for t in mine) - first).total_seconds()
            each = " ".join(f"#{t.number}:{t.params['variant'][:3]} {_secs(t):.1f}s" for t in mine)
            print(f"  worker {worker}: {len(mine)} trials, in trials {sum(map(_secs, mine)):.1f} s, "
                  f"from +{start:.1f} s to +{end:.1f} s ({each})")
        return span, wall
    finally:
        admin(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
        admin(f'DROP DATABASE IF EXISTS "{db}_mlflow" WITH (FORCE)')


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=6)
    ap.add_argument("--epochs", type=int, nargs=3, default=[2, 3, 2])
    ap.add_argument("--data", default=None)
    ap.add_argument("--pairs", type=int, default=1,
                    help="measure this many (1 worker, 2 workers) pairs back to back, alternating the order, and "
                         "report the median ratio (this shared machine drifts by 20%% over minutes)")
    args = ap.parse_args()
    ratios, walls = [], []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        space = tmp / "space.yaml"
        space.write_text(SPACE.format(e1=args.epochs[0], e2=args.epochs[1], e3=args.epochs[2]))
        for pair in range(args.pairs):
            order = (1, 2) if pair % 2 == 0 else (2, 1)
            measured = {workers: run(workers, args.trials, space, tmp, args.data) for workers in order}
            (one, wall1), (two, wall2) = measured[1], measured[2]
            ratios.append(one / two)
            walls.append(wall1 / wall2)
            print(f"pair {pair + 1}: speedup (trial span) {one / two:.2f}x, (wall) {wall1 / wall2:.2f}x")
    median = float(np.median(ratios))
    print(f"speedup (trial span) {median:.2f}x median of {len(ratios)} pair(s) "
          f"[{', '.join(f'{r:.2f}' for r in ratios)}], (wall) {float(np.median(walls)):.2f}x; target >= 1.6x")
    return 0 if median >= 1.6 else 1


if __name__ == "__main__":
    sys.exit(main())
