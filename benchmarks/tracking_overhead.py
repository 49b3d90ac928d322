"""Tracking overhead: MLflowSink (one log_batch per epoch from a background thread) against a real `mlflow server`.

    python benchmarks/tracking_overhead.py [--epochs 2 3 2] [--data DIR]

Starts `mlflow server` (SQLite backend) on a free loopback port, trains one real trial (cpu profile: frozen small3d
features of the cached synthetic data set, or --data) with the MLflow sink, and reports:
- metrics per epoch (DetailedMetrics.to_mlflow), trial wall time;
- tracking cost on the training thread (time inside sink.log/close + the final flush in tracker.end) in % of the
  trial's wall time (target <= 1%), and the background thread's busy time;
- the naive way, one `MlflowClient.log_metric` request per value, timed on a sample of calls against the same
  server and extrapolated to every value of the trial, in % of wall time, and its ratio to the batched way.
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, nargs=3, default=[2, 3, 2], help="epochs of phases 1, 2, 3")
    ap.add_argument("--data", default=None)
    ap.add_argument("--naive-sample", type=int, default=300, help="log_metric calls timed for the naive estimate")
    args = ap.parse_args()

    import torch
    from mlflow import MlflowClient

    from mvfouls_ab.config import PROFILES, TrainingConfig
    from mvfouls_ab.study import prepare_data
    from mvfouls_ab.tracking import MLflowSink, RunTracker
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
            tracker.end("FINISHED")
            flush_s = time.perf_counter() - t_end
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
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            time.sleep(1)
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    print(f"epochs {epochs}, metrics per epoch {per_epoch}, metric values {values}, trial wall {wall:.1f} s")
    print(f"batched (MLflowSink): training-thread cost {batched:.3f} s = {100 * batched / wall:.2f}% of wall "
          f"(log/close {sink.log_s:.3f} s, final flush {flush_s:.3f} s); background thread busy "
          f"{tracker.logger.busy_s:.2f} s for {tracker.logger.requests} requests")
    print(f"naive (one log_metric per value): {1000 * per_call:.1f} ms per call x {values} = {naive:.1f} s = "
          f"{100 * naive / wall:.1f}% of wall; naive / batched = {naive / max(batched, 1e-9):.0f}x")
    return 0 if batched <= 0.01 * wall else 1


if __name__ == "__main__":
    sys.exit(main())
