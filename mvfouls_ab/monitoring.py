"""TrainingMonitor: fans each epoch's DetailedMetrics record out to sinks (console, JSONL file; MLflow/Optuna later).

A failing sink never stops training: its exception is recorded (``TrainingMonitor.failures``) and reported with
``warnings.warn`` and the other sinks still get the record. The one exception that does propagate is
``optuna.TrialPruned`` (the Optuna sink's prune signal), raised after every sink has seen the record.

Console summary line (one per epoch), rates in percent for reading:
``[phase1_basic 2/10 | 12/40] train 1.2345 val 1.4567 | action MR 45.1% F1 40.2% | severity MR 38.0% F1 35.5% |
LB 41.6% | worst severity/red_card 0.0% | lr 1.00e-04 | gn 2.31 | events loss_spike,rollback``
"""
from __future__ import annotations

import math
import sys
import warnings
from pathlib import Path
from typing import IO, Protocol, Self, runtime_checkable

from optuna.exceptions import TrialPruned
from tqdm import tqdm

from .metrics import DetailedMetrics


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
