"""The trainer's sinks: every epoch's DetailedMetrics record goes to each of them (Sink protocol).

TrainingMonitor fans the record out; ConsoleSink prints a line (and a progress bar), JsonlSink appends to a file,
MLflowSink sends it to the run's RunTracker (one batched request per epoch, figures at phase ends); the Optuna sink
(orchestration/study.py) reports it for pruning.

A failing sink never stops training: its exception is recorded (``TrainingMonitor.failures``) and reported with
``warnings.warn`` and the other sinks still get the record. The one exception that does propagate is
``optuna.TrialPruned`` (the Optuna sink's prune signal), raised after every sink has seen the record.

Console summary line (one per epoch), rates in percent for reading:
``[phase1_basic 2/10 | 12/40] train 1.2345 val 1.4567 | action MR 45.1% F1 40.2% | severity MR 38.0% F1 35.5% |
LB 41.6% | worst severity/red_card 0.0% | lr 1.00e-04 | gn 2.31 | events loss_spike,rollback``
"""
from __future__ import annotations

import logging
import math
import sys
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any, Protocol, Self, runtime_checkable

import numpy as np
from optuna.exceptions import TrialPruned
from tqdm import tqdm

from ..evaluation.metrics import DetailedMetrics
from ..labels import TASKS
from .runs import RunTracker

log = logging.getLogger(__name__)


@runtime_checkable
class Sink(Protocol):
    def log(self, record: DetailedMetrics) -> None: ...

    def close(self) -> None: ...


def _pct(x: float | None) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}%"


def _num(x: float | None, fmt: str) -> str:
    return "n/a" if x is None else format(x, fmt)


def summary_line(record: DetailedMetrics, total_epochs: int | None = None, phase_epochs: int | None = None) -> str:
    """The one-line epoch summary ConsoleSink prints (epoch numbers 1-based)."""
    local = f"{record.epoch + 1}" + (f"/{phase_epochs}" if phase_epochs else "")
    glob = f"{record.step + 1}" + (f"/{total_epochs}" if total_epochs else "")
    task, slug, recall = record.worst_class()
    events = ",".join(str(e.get("kind", "?")) for e in record.events) or "-"
    return (f"[{record.phase} {local} | {glob}] train {_num(record.train_loss, '.4f')} "
            f"{record.split} {_num(record.val_loss, '.4f')} | "
            f"action MR {_pct(record.action_macro_recall)} F1 {_pct(record.action_macro_f1)} | "
            f"severity MR {_pct(record.severity_macro_recall)} F1 {_pct(record.severity_macro_f1)} | "
            f"LB {_pct(record.leaderboard)} | worst {task}/{slug} {_pct(recall if task else None)} | "
            f"lr {_num(record.lr, '.2e')} | gn {_num(record.grad_norm, '.2f')} | events {events}")


class ConsoleSink:
    """A tqdm bar over the planned epochs and one summary line per epoch (written above the bar)."""

    def __init__(self, total_epochs: int | None = None, file: IO[str] | None = None, progress: bool = True,
                 phase_epochs: dict[str, int] | None = None) -> None:
        self.total_epochs = total_epochs
        self.phase_epochs = phase_epochs or {}
        self.file = file if file is not None else sys.stderr
        self.progress = progress
        self.bar: tqdm | None = None

    def log(self, record: DetailedMetrics) -> None:
        if self.progress and self.bar is None:
            self.bar = tqdm(total=self.total_epochs, desc="epochs", unit="epoch", file=self.file,
                            dynamic_ncols=True, leave=True)
        line = summary_line(record, self.total_epochs, self.phase_epochs.get(record.phase))
        if self.bar is not None:
            self.bar.write(line, file=self.file)
            self.bar.set_postfix_str(f"{record.phase} LB {_pct(record.leaderboard)}", refresh=False)
            self.bar.update(1)
        else:
            print(line, file=self.file, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class JsonlSink:
    """Appends one JSON line per record (DetailedMetrics.to_json) to ``path``, flushed after each line."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh: IO[str] | None = self.path.open("a", encoding="utf-8")

    def log(self, record: DetailedMetrics) -> None:
        if self._fh is None:
            self._fh = self.path.open("a", encoding="utf-8")
        self._fh.write(record.to_json() + "\n")
        self._fh.flush()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def read_jsonl(path: str | Path) -> list[DetailedMetrics]:
    """The records a JsonlSink wrote (blank lines skipped)."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [DetailedMetrics.from_json(line) for line in lines if line.strip()]


def checkpointed_records(run_dir: Path | str) -> list[DetailedMetrics]:
    """The DetailedMetrics records the Trainer wrote with its last checkpoint (run_dir/metrics.jsonl). A last line
    cut short (a writer killed mid-append) is left out: its epoch is not in the checkpoint either."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            records.append(DetailedMetrics.from_json(line))
        except (TypeError, ValueError):
            log.warning("%s: unreadable line left out (a write cut short)", path)
    return records


class TrainingMonitor:
    """Fans records out to sinks; sink failures are recorded and warned about, TrialPruned propagates."""

    def __init__(self, sinks: list[Sink] | tuple[Sink, ...] = ()) -> None:
        self.sinks = list(sinks)
        self.failures: list[dict[str, object]] = []

    def _call(self, sink: Sink, method: str, record: DetailedMetrics | None) -> TrialPruned | None:
        try:
            getattr(sink, method)(*(() if record is None else (record,)))
        except TrialPruned as exc:
            return exc
        except Exception as exc:  # noqa: BLE001 - a broken sink must not stop training
            name = type(sink).__name__
            self.failures.append({"sink": name, "method": method, "step": None if record is None else record.step,
                                  "error": repr(exc)})
            warnings.warn(f"sink {name}.{method} failed and was skipped: {exc!r}", RuntimeWarning, stacklevel=3)
        return None

    def log(self, record: DetailedMetrics) -> None:
        pruned = [p for p in (self._call(sink, "log", record) for sink in self.sinks) if p is not None]
        if pruned:
            raise pruned[0]

    def close(self) -> None:
        for sink in self.sinks:
            self._call(sink, "close", None)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---- the training sink --------------------------------------------------------------------------------------
def class_distribution(data) -> dict[str, dict[str, list[int]]]:
    """{split: {task: counts per class}} from a DataBundle's labelled splits."""
    out: dict[str, dict[str, list[int]]] = {}
    for split in ("train", "valid", "test"):
        sa = getattr(data, split, None)
        if sa is None:
            continue
        out[split] = {task: np.bincount([getattr(a, task) for a in sa.actions if getattr(a, task) is not None],
                                        minlength=len(names)).astype(int).tolist()
                      for task, names in TASKS.items()}
    return out



class MLflowSink:
    """Sink that logs DetailedMetrics records to one child run.

    log(record): all of ``record.to_mlflow()`` as one metrics op (step = epoch; the RunLogger merges the ops of
    consecutive epochs into few requests) and the epoch's confusion matrices as
    JSON. At each phase change and at close: confusion matrices of the phase's last epoch and the learning curves as
    plotly HTML. ``log_result(result)`` adds the best epoch's confusion matrices, summary metrics ``best/...``, the
    prediction files and the best checkpoint. ``close()`` flushes but does not end the run (``tracker.end`` does).
    """

    def __init__(self, tracker: RunTracker) -> None:
        self.tracker = tracker
        self.history: list[dict[str, float]] = []
        self.confusion: dict[int, tuple[str, dict[str, list]]] = {}   # step -> (phase, task -> matrix)
        self.last = None
        self.log_s = 0.0          # time the training thread spent inside log()/close()

    def log(self, record) -> None:
        t0 = time.perf_counter()
        metrics = run_metrics(record.to_mlflow())
        step = int(record.step)   # global epoch index (record.epoch restarts at 0 in every phase)
        if self.last is not None and str(self.last.phase) != str(record.phase):
            self._phase_end(self.last)
        self.tracker.log_metrics(metrics, step=step)
        cms = getattr(record, "confusion_matrices", None) or {}
        if cms:
            matrices = {k: np.asarray(v).tolist() for k, v in cms.items()}
            self.tracker.log_dict(matrices, f"confusion/epoch_{step:03d}.json")
            self.confusion[step] = (str(record.phase), matrices)
        self.history.append({**metrics, "_step": step})
        self.last = record
        self.log_s += time.perf_counter() - t0

    def backfill(self, records: list) -> int:
        """Log the records of a resumed run that MLflow does not have yet (a worker killed after writing an epoch's
        checkpoint but before its metrics were sent). Steps already in the run are skipped, so nothing repeats."""
        if not records:
            return 0
        # one op, sent by the logger thread in order and retried like every other: it reads the run's history
        # there (also when the server is down now) and logs the missing steps only, so nothing is logged twice
        ts = int(time.time() * 1000)
        self.tracker.logger.submit({"op": "backfill", "key": f"{records[0].split}/leaderboard", "records": [
            {"step": int(r.step), "ts": ts, "values": {k: float(v) for k, v in run_metrics(r.to_mlflow()).items()
                                                       if v is not None and np.isfinite(float(v))}}
            for r in records]})
        missing = records
        if records:
            self.history = [{**run_metrics(r.to_mlflow()), "_step": int(r.step)} for r in records]
            self.confusion = {int(r.step): (str(r.phase), {k: np.asarray(v).tolist() for k, v in cms.items()})
                              for r in records if (cms := getattr(r, "confusion_matrices", None) or {})}
            self.last = records[-1]
        return len(missing)

    def _phase_end(self, record) -> None:
        cms = getattr(record, "confusion_matrices", None) or {}
        if cms:
            self.tracker.log_plot("confusion", f"confusion/{_slug(record.phase)}_end.html",
                                  matrices={k: np.asarray(v).tolist() for k, v in cms.items()},
                                  title=f"{record.phase}: epoch {record.step + 1}")
        if self.history:
            self.tracker.log_plot("learning_curves", "learning_curves.html", history=self.history)

    def log_result(self, result) -> None:
        """The run's final artifacts: best epoch confusion HTML, best/... metrics, predictions, checkpoint."""
        best = getattr(result, "best", None)
        if best is not None:
            step = int(best.step)
            self.tracker.log_metrics({f"best/{k}": v for k, v in run_metrics(best.to_mlflow()).items()}, step=step)
            self.tracker.set_tags({"best_epoch": step + 1, "best_phase": best.phase})
            cms = getattr(best, "confusion_matrices", None) or {}
            if cms:
                self.tracker.log_plot("confusion", "confusion/best.html",
                                      matrices={k: np.asarray(v).tolist() for k, v in cms.items()},
                                      title=f"best epoch {step + 1} ({best.phase})")
        parameters = getattr(result, "parameters", None) or {}
        if parameters:
            self.tracker.log_params({f"parameters_{k}": v for k, v in parameters.items()})
        for path in (getattr(result, "predictions", None) or {}).values():
            self.tracker.log_artifact(path, "predictions")
        checkpoint = getattr(result, "checkpoint", None)
        if checkpoint:
            self.tracker.log_artifact(checkpoint, "checkpoint")

    def close(self) -> None:
        t0 = time.perf_counter()
        if self.last is not None:
            self._phase_end(self.last)
            self.last = None
        if self.confusion:
            self.tracker.log_table(confusion_table(self.confusion), "confusion/confusion_matrices.json")
            self.tracker.log_plot("confusion_epochs", "confusion/per_epoch.html",
                                  epochs={str(k): v for k, v in sorted(self.confusion.items())})
            self.confusion = {}
        self.tracker.flush(timeout=0.0)   # non-blocking: the run is ended (and fully flushed) by tracker.end
        self.log_s += time.perf_counter() - t0


# Per-epoch values that are not compared as curves: the confusion matrix cells (80 series per epoch), the class
# supports (constant) and the predicted counts (the matrix's column sums). They go into one table per run
# (confusion/confusion_matrices.json) and a figure with an epoch slider (confusion/per_epoch.html) instead.
_TABLE_ONLY = ("/confusion/", "/support/", "/predicted/")


def run_metrics(metrics: Mapping[str, float]) -> dict[str, float]:
    """The metrics a run logs as series: DetailedMetrics.to_mlflow() without the table-only keys."""
    return {k: v for k, v in metrics.items() if not any(part in k for part in _TABLE_ONLY)}


def _class_names(key: str, n: int) -> list[str]:
    for task, names in TASKS.items():
        if task in key and len(names) == n:
            return list(names)
    return [str(i) for i in range(n)]


def confusion_table(confusion: Mapping[int, tuple[str, Mapping[str, list]]]) -> dict[str, list]:
    """Long format of every epoch's confusion matrices: one row per (epoch, task, true class, predicted class)."""
    cols: dict[str, list] = {"epoch": [], "phase": [], "task": [], "true_class": [], "predicted_class": [],
                             "count": []}
    for step, (phase, matrices) in sorted(confusion.items()):
        for task, cm in matrices.items():
            cm = np.asarray(cm)
            names = _class_names(task, cm.shape[0])
            for i, true_name in enumerate(names):
                for j, pred_name in enumerate(names):
                    for col, value in zip(cols, (step + 1, phase, task, true_name, pred_name, int(cm[i, j]))):
                        cols[col].append(value)
    return cols


def _slug(value: Any) -> str:
    return "".join(c if c.isalnum() else "_" for c in str(value)).strip("_").lower() or "phase"
