"""The design's targets (DESIGN.md "Evaluation Metrics"), the only copy; all rates as fractions:
macro recall > 0.45 on both tasks, macro F1 > 0.40 on both tasks, every class recall > 0.25, loss < 5.0.

``Target.name`` is the key in a split summary (ranking.split_summary); ``Target.metric`` is the name under the
metric-name scheme, after ``{split}/`` (``val/action/macro_recall``). ``min_class_recall`` is the lowest
per-class recall over both tasks (the report derives it; DetailedMetrics logs ``{split}/{task}/min_recall``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Target:
    name: str         # key in a split summary
    op: str           # ">" or "<"
    threshold: float
    label: str
    metric: str       # the metric name after "{split}/"

    def passed(self, value: float | None) -> bool:
        if value is None or not math.isfinite(value):
            return False
        return value > self.threshold if self.op == ">" else value < self.threshold

    def constraint(self, value: float | None) -> float:
        """Optuna constraint value: <= 0 means met (strict targets need a small margin, hence 1e-9)."""
        if value is None or not math.isfinite(value):
            return 1.0
        gap = self.threshold - value if self.op == ">" else value - self.threshold
        return gap + 1e-9

    @property
    def higher_is_better(self) -> bool:
        return self.op == ">"


TARGETS: tuple[Target, ...] = (
    Target("action_macro_recall", ">", 0.45, "action macro recall > 45%", "action/macro_recall"),
    Target("severity_macro_recall", ">", 0.45, "severity macro recall > 45%", "severity/macro_recall"),
    Target("action_macro_f1", ">", 0.40, "action macro F1 > 0.40", "action/macro_f1"),
    Target("severity_macro_f1", ">", 0.40, "severity macro F1 > 0.40", "severity/macro_f1"),
    Target("worst_class_recall", ">", 0.25, "every class recall > 25%", "min_class_recall"),
    Target("loss", "<", 5.0, "loss < 5.0", "loss"),
)
BY_NAME: dict[str, Target] = {t.name: t for t in TARGETS}
CLASS_RECALL_TARGET: float = BY_NAME["worst_class_recall"].threshold   # a class under this recall misses
