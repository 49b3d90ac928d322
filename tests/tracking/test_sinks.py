import io
import json
import re
import warnings

import numpy as np
import optuna
import pytest

from mvfouls_ab.evaluation.metrics import DetailedMetrics, compute_detailed_metrics
from mvfouls_ab.tracking.sinks import ConsoleSink, JsonlSink, Sink, TrainingMonitor, read_jsonl, summary_line


def record(step: int, events=()) -> DetailedMetrics:
    targets = {"action": np.arange(16) % 8, "severity": np.arange(16) % 4}
    logits = {"action": np.eye(8)[targets["action"]], "severity": np.eye(4)[(targets["severity"] + (step % 2)) % 4]}
    logits["severity"][targets["severity"] == 3] = np.eye(4)[0]   # red card never predicted
    return compute_detailed_metrics(epoch=step % 2, phase="phase1_basic", split_logits=logits, targets=targets,
                                    train_loss=1.25, val_loss=1.5, step=step, lr=1e-4, grad_norm=2.5,
                                    events=list(events))


LINE = re.compile(r"^\[(?P<phase>\S+) (?P<local>\d+)/(?P<pe>\d+) \| (?P<glob>\d+)/(?P<total>\d+)\] "
                  r"train (?P<train>[\d.]+) val (?P<val>[\d.]+) \| action MR (?P<amr>[\d.]+)% F1 [\d.]+% \| "
                  r"severity MR (?P<smr>[\d.]+)% F1 [\d.]+% \| LB (?P<lb>[\d.]+)% \| "
                  r"worst (?P<worst>\w+/\w+) (?P<wr>[\d.]+)% \| lr (?P<lr>\S+) \| gn (?P<gn>\S+) \| "
                  r"events (?P<events>\S+)$")


def test_console_sink_line_format_and_bar():
    out = io.StringIO()
    sink = ConsoleSink(total_epochs=4, file=out, phase_epochs={"phase1_basic": 2})
    assert isinstance(sink, Sink)
    r0, r1 = record(0), record(1, events=[{"kind": "loss_spike"}, {"kind": "rollback"}])
    sink.log(r0)
    sink.log(r1)
    sink.close()
    lines = [m for m in (LINE.match(s.strip("\r")) for s in out.getvalue().splitlines()) if m]
    assert len(lines) == 2
    first, second = lines
    assert first["phase"] == "phase1_basic" and first["local"] == "1" and first["glob"] == "1"
    assert first["total"] == "4" and first["pe"] == "2"
    assert first["train"] == "1.2500" and first["val"] == "1.5000"
    assert float(first["amr"]) == pytest.approx(100 * r0.action_macro_recall, abs=0.05) == 100.0
    assert float(first["smr"]) == pytest.approx(75.0)
    assert first["worst"] == "severity/red_card" and first["wr"] == "0.0"
    assert first["lr"] == "1.00e-04" and first["gn"] == "2.50" and first["events"] == "-"
    assert second["glob"] == "2" and second["events"] == "loss_spike,rollback"
    assert "2/4" in out.getvalue()                           # the tqdm bar reached 2 of 4 epochs
    assert first.group(0) == summary_line(r0, total_epochs=4, phase_epochs=2)
    assert summary_line(r0).startswith("[phase1_basic 1 | 1] train 1.2500 val 1.5000 | action MR 100.0% F1 100.0% |")


def test_jsonl_sink_round_trip(tmp_path):
    path = tmp_path / "run" / "metrics.jsonl"
    sink = JsonlSink(path)
    sink.log(record(0))
    assert len(path.read_text().splitlines()) == 1            # flushed after each record
    sink.log(record(1))
    sink.close()
    back = read_jsonl(path)
    assert [r.step for r in back] == [0, 1]
    assert back[1].to_dict() == record(1).to_dict() | {"peak_rss_mb": back[1].peak_rss_mb}
    assert json.loads(path.read_text().splitlines()[0])["severity_per_class_recall"][3] == 0.0


class Broken:
    def __init__(self):
        self.calls = 0

    def log(self, record):
        self.calls += 1
        raise OSError("disk full")

    def close(self):
        raise RuntimeError("cannot close")


class Pruner:
    def log(self, record):
        if record.step >= 1:
            raise optuna.TrialPruned(f"pruned at step {record.step}")

    def close(self):
        pass


def test_monitor_survives_broken_sink_and_propagates_pruning(tmp_path):
    path = tmp_path / "m.jsonl"
    broken = Broken()
    monitor = TrainingMonitor([broken, Pruner(), JsonlSink(path)])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        monitor.log(record(0))
        with pytest.raises(optuna.TrialPruned, match="step 1"):
            monitor.log(record(1))
        monitor.close()
    assert broken.calls == 2
    assert [r.step for r in read_jsonl(path)] == [0, 1]      # the sink after the pruner still got epoch 1
    assert [f["method"] for f in monitor.failures] == ["log", "log", "close"]
    assert "disk full" in monitor.failures[0]["error"]
    assert sum("Broken.log failed" in str(w.message) for w in caught) == 2
