"""Tracking overhead: MLflowSink (metrics merged into few log_batch requests by a background thread) against MLflow.

    python benchmarks/tracking_overhead.py [--epochs 2 3 2] [--data DIR] [--replay-epochs 26] [--replay-store URI]

Starts `mlflow server` (SQLite backend) on a free loopback port, trains one real trial (cpu profile: frozen small3d
features of the cached synthetic data set, or --data) with the MLflow sink, and reports:
- metrics per epoch (DetailedMetrics.to_mlflow), trial wall time;
- tracking cost on the training thread (time inside sink.log/close + tracker.end as a study trial calls it,
  `wait=False`: the last sends go on in a closing thread while the next trial trains) in % of the trial's wall time
  (target <= 1%), the time that closing thread then needed, and the background thread's requests, busy time and CPU time per epoch (all the
  trial's operations: params, metrics, confusion JSONs, figures, artifacts);
- the naive way, one `MlflowClient.log_metric` request per value, timed on a sample of calls against the same
  server and extrapolated to every value of the trial, in % of wall time, and its ratio to the batched way;
- the metrics alone, before/after coalescing: the trial's metric dicts replayed as --replay-epochs epochs, one every
  --replay-interval s, through a RunTracker with linger_s=0 (one log_batch per epoch, as before coalescing) and with
  the default linger_s, against the server (client CPU in the logger thread + the server's CPU) and against
  in-process stores (a SQLite file, plus every --replay-store URI, e.g. a PostgreSQL database): log_batch requests,
  busy time and the logger thread's CPU time (time.thread_time) per epoch.
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(workdir: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                             "--backend-store-uri", f"sqlite:///{workdir / 'mlflow.db'}",
                             "--artifacts-destination", str(workdir / "artifacts"), "--workers", "1"],
                            cwd=workdir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                            start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2):
                return proc, url
        except OSError:
            time.sleep(0.3)
    os.killpg(proc.pid, signal.SIGKILL)
    raise RuntimeError("mlflow server did not start")


def group_cpu(pgid: int) -> float:
    """CPU seconds (user + system) of the live processes of process group ``pgid`` (mlflow server and its workers)."""
    total = 0
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()     # from field 3 (state) on: pgrp = 5, utime = 14, stime = 15
        if int(fields[2]) == pgid:
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def replay(uri: str, epochs: list[dict[str, float]], linger_s: float, interval: float,
           server_pgid: int | None = None) -> dict[str, float]:
    """Log ``epochs`` (one metrics dict each, ``interval`` s apart) to a new run of ``uri``; the logger's cost."""
    from mvfouls_ab.tracking import RunTracker

    tracker = RunTracker(uri, "tracking-replay", f"linger-{linger_s:g}", linger_s=linger_s)
    assert tracker.wait_run_id(120) and tracker.flush(120)
    lg = tracker.logger
    req0, busy0, cpu0 = lg.requests, lg.busy_s, lg.cpu_s
    srv0 = group_cpu(server_pgid) if server_pgid else 0.0
    t0 = time.perf_counter()
    for step, values in enumerate(epochs):
        tracker.log_metrics(values, step=step)
        time.sleep(interval)
    t1 = time.perf_counter()
    assert tracker.flush(300)
    flush_s = time.perf_counter() - t1
    out = {"requests": lg.requests - req0, "busy_s": lg.busy_s - busy0, "cpu_s": lg.cpu_s - cpu0,
           "server_cpu_s": group_cpu(server_pgid) - srv0 if server_pgid else float("nan"),
           "wall_s": time.perf_counter() - t0, "flush_s": flush_s}
    tracker.end("FINISHED")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, nargs=3, default=[2, 3, 2], help="epochs of phases 1, 2, 3")
    ap.add_argument("--data", default=None)
    ap.add_argument("--naive-sample", type=int, default=300, help="log_metric calls timed for the naive estimate")
    ap.add_argument("--replay-epochs", type=int, default=26, help="epochs of the metrics-only replay (0: none)")
    ap.add_argument("--replay-interval", type=float, default=0.3, help="seconds between replayed epochs")
    ap.add_argument("--replay-store", action="append", default=[],
                    help="also replay to this in-process tracking store (e.g. an empty PostgreSQL database's URL)")
    args = ap.parse_args()

    import torch
    from mlflow import MlflowClient

    from mvfouls_ab.config import PROFILES, TrainingConfig
    from mvfouls_ab.orchestration.study import prepare_data
    from mvfouls_ab.tracking import DEFAULT_LINGER_S, MLflowSink, RunTracker, wait_closed
    from mvfouls_ab.training.trainer import Trainer

    torch.set_num_threads(max(1, (os.cpu_count() or 1)))
    cfg = TrainingConfig().replace(**PROFILES["cpu"], phase1_epochs=args.epochs[0], phase2_epochs=args.epochs[1],
                                   phase3_epochs=args.epochs[2],
                                   data_root=str(Path(args.data).resolve()) if args.data else "")
    data = prepare_data(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        proc, url = start_server(tmp)
        try:
            tracker = RunTracker(url, "tracking-overhead", "trial", run_dir=tmp / "run")
            tracker.wait_run_id(30)
            tracker.log_params(cfg.flat())
            sink = MLflowSink(tracker)
            t0 = time.perf_counter()
            result = Trainer(cfg, data, [sink], tmp / "run", resume=False).run()
            sink.log_result(result)
            t_end = time.perf_counter()
            tracker.end("FINISHED", wait=False)          # as study.objective ends a trial's run
            flush_s = time.perf_counter() - t_end
            wait_closed()
            closing_s = time.perf_counter() - t_end
            wall = time.perf_counter() - t0
            epochs = len(result.history)
            per_epoch = len(result.history[0].to_mlflow())
            values = sum(len(r.to_mlflow()) for r in result.history)
            batched = sink.log_s + flush_s

            client = MlflowClient(url)
            run_id = client.create_run(client.get_experiment_by_name("tracking-overhead").experiment_id).info.run_id
            keys = list(result.history[0].to_mlflow().items())
            t1 = time.perf_counter()
            for i in range(args.naive_sample):
                k, v = keys[i % len(keys)]
                client.log_metric(run_id, k, float(v), step=i // len(keys))
            per_call = (time.perf_counter() - t1) / args.naive_sample
            naive = per_call * values

            dicts = [r.to_mlflow() for r in result.history]
            replay_epochs = [dicts[i % len(dicts)] for i in range(args.replay_epochs)]
            stores = [("mlflow server", url, proc.pid), ("SQLite file", f"sqlite:///{tmp / 'replay.db'}", None)]
            stores += [(uri.split("://")[0].split("+")[0], uri, None) for uri in args.replay_store]
            replays = [(name, linger, replay(uri, replay_epochs, linger, args.replay_interval, pgid))
                       for name, uri, pgid in stores if replay_epochs for linger in (0.0, DEFAULT_LINGER_S)]
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            time.sleep(1)
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    print(f"epochs {epochs}, metrics per epoch {per_epoch}, metric values {values}, trial wall {wall:.1f} s")
    print(f"batched (MLflowSink): training-thread cost {batched:.3f} s = {100 * batched / wall:.2f}% of wall "
          f"(log/close {sink.log_s:.3f} s, end {flush_s:.3f} s; the closing thread then sent the rest in "
          f"{closing_s:.3f} s); background thread busy "
          f"{tracker.logger.busy_s:.2f} s for {tracker.logger.requests} requests")
    lg = tracker.logger
    print(f"background thread per epoch (all operations): {lg.requests / epochs:.2f} requests, "
          f"busy {1000 * lg.busy_s / epochs:.1f} ms, CPU {1000 * lg.cpu_s / epochs:.1f} ms")
    print(f"naive (one log_metric per value): {1000 * per_call:.1f} ms per call x {values} = {naive:.1f} s = "
          f"{100 * naive / wall:.1f}% of wall; naive / batched = {naive / max(batched, 1e-9):.0f}x")
    if replays:
        n = args.replay_epochs
        print(f"metrics only: {n} epochs x {per_epoch} metrics, one every {args.replay_interval:g} s; per epoch "
              f"(linger 0 = one log_batch per epoch, as before coalescing):")
        print(f"  {'store':<16}{'linger':>7}{'requests':>10}{'busy ms':>9}{'thread CPU ms':>15}{'server CPU ms':>15}"
              f"{'final flush s':>15}")
        for name, linger, r in replays:
            print(f"  {name:<16}{linger:>6g}s{r['requests'] / n:>10.2f}{1000 * r['busy_s'] / n:>9.1f}"
                  f"{1000 * r['cpu_s'] / n:>15.1f}{1000 * r['server_cpu_s'] / n:>15.1f}{r['flush_s']:>15.3f}")
    return 0 if batched <= 0.01 * wall else 1


if __name__ == "__main__":
    sys.exit(main())
