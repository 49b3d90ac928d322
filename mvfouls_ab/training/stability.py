"""StabilityGuard: watches every step and epoch, and tells the trainer how to recover (design: Error Handling).

The guard only decides and records; the trainer acts on the events it returns:
- ``nan_loss`` / ``loss_spike``  -> ``rollback`` to the last stable checkpoint (the state at the start of the epoch)
  and ``lr_backoff`` (LR x cfg.lr_backoff for the rest of the phase), then the epoch is retried;
  after cfg.max_recoveries such recoveries in one phase -> ``fallback_variant`` (a simpler model, recorded).
- ``oom`` -> halve the batch and double gradient accumulation (same effective batch), retry the epoch.
- ``class_collapse`` -> alert after cfg.collapse_patience epochs at 0% validation recall for a class;
  the trainer may respond by raising that class's weight to the phase cap (cfg.collapse_response).
- ``grad_norm`` -> a non-finite or exploding/vanishing gradient norm was seen (norms are tracked every step).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from ..config import TrainingConfig

EVENT_KINDS = ("loss_spike", "nan_loss", "grad_norm", "class_collapse", "collapse_response", "oom",
               "rollback", "lr_backoff", "fallback_variant", "oom_eval_batch", "oom_eval_cpu", "subset_changed")
STEP_SPIKE_FACTOR = 5.0     # a step loss > STEP_SPIKE_FACTOR * spike_factor * running mean is an explosion
STEP_WARMUP = 20            # steps of a phase before the running mean is trusted
EMA_DECAY = 0.95
GRAD_EXPLODE = 1e4          # grad norm above this is recorded as exploding (clipping handles the step)
GRAD_VANISH = 1e-8


@dataclass
class Event:
    kind: str
    epoch: int
    step: int
    detail: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class StabilityGuard:
    """Decides on recoveries; its whole state round-trips through state_dict() for checkpoints."""

    def __init__(self, cfg: TrainingConfig) -> None:
        self.cfg = cfg
        self.epoch = 0
        self.step = 0
        self.lr_scale = 1.0                 # product of LR backoffs in the current phase
        self.recoveries = 0                 # rollbacks in the current phase
        self.fallbacks = 0
        self.batch_size = cfg.batch_size
        self.grad_accum = cfg.grad_accum
        self.prev_train_loss: float | None = None
        self.loss_ema: float | None = None
        self.phase_steps = 0
        self.collapse_streak: dict[str, list[int]] = {}
        self.events: list[Event] = []       # every event of the run, in order
        self._grad_alerted = False

    # ---- bookkeeping --------------------------------------------------------------------------------
    def record(self, kind: str, **detail: Any) -> Event:
        """Record an event of the current epoch/step (the trainer records its responses here too)."""
        event = Event(kind, self.epoch, self.step, detail)
        self.events.append(event)
        return event

    def new_phase(self) -> None:
        """Loss references and recovery counts restart with each phase (its data and loss differ)."""
        self.prev_train_loss = None
        self.loss_ema = None
        self.phase_steps = 0
        self.recoveries = 0
        self.lr_scale = 1.0

    def begin_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.step = 0
        self._grad_alerted = False

    def epoch_events(self, epoch: int) -> list[Event]:
        return [e for e in self.events if e.epoch == epoch]

    # ---- per step ------------------------------------------------------------------------------------
    def check_step(self, loss: float, grad_norm: float | None = None) -> list[Event]:
        """Call after each forward (grad_norm after backward). Returns nan_loss / loss_spike / grad_norm events."""
        self.step += 1
        out: list[Event] = []
        if not math.isfinite(loss):
            out.append(self.record("nan_loss", loss=str(loss)))
            return out
        limit = STEP_SPIKE_FACTOR * self.cfg.spike_factor
        if self.loss_ema is not None and self.phase_steps >= STEP_WARMUP and loss > limit * max(self.loss_ema, 1e-3):
            out.append(self.record("loss_spike", loss=loss, running_mean=self.loss_ema, factor=limit, scope="step"))
            return out
        self.loss_ema = loss if self.loss_ema is None else EMA_DECAY * self.loss_ema + (1 - EMA_DECAY) * loss
        self.phase_steps += 1
        if grad_norm is not None and not self._grad_alerted:
            if not math.isfinite(grad_norm) or grad_norm > GRAD_EXPLODE:
                self._grad_alerted = True
                out.append(self.record("grad_norm", grad_norm=str(grad_norm), status="exploding"))
            elif grad_norm < GRAD_VANISH and loss > 1e-4:
                self._grad_alerted = True
                out.append(self.record("grad_norm", grad_norm=grad_norm, status="vanishing"))
        return out

    # ---- per epoch -----------------------------------------------------------------------------------
    def end_epoch(self, val_loss: float, train_loss: float,
                  recalls: dict[str, list[float]] | None = None, subset_changed: bool = False) -> list[Event]:
        """Epoch-level checks. recalls: task -> per-class validation recall (nan where a class has no samples).
        subset_changed: the epoch trained on other samples than the previous one (a curriculum step): its loss is
        not compared with the previous epoch's (harder samples raise it legitimately), only recorded."""
        out: list[Event] = []
        if not (math.isfinite(train_loss) and math.isfinite(val_loss)):
            out.append(self.record("nan_loss", train_loss=str(train_loss), val_loss=str(val_loss), scope="epoch"))
            return out
        prev = self.prev_train_loss
        if subset_changed and prev is not None:
            out.append(self.record("subset_changed", loss=train_loss, previous=prev))
        elif prev is not None and train_loss > self.cfg.spike_factor * prev:
            out.append(self.record("loss_spike", loss=train_loss, previous=prev, factor=self.cfg.spike_factor,
                                  scope="epoch"))
            return out
        self.prev_train_loss = train_loss
        for task, per_class in (recalls or {}).items():
            streak = self.collapse_streak.setdefault(task, [0] * len(per_class))
            for c, r in enumerate(per_class):
                if r is None or (isinstance(r, float) and math.isnan(r)):
                    continue
                streak[c] = streak[c] + 1 if r <= 0.0 else 0
                if streak[c] == self.cfg.collapse_patience:
                    out.append(self.record("class_collapse", task=task, cls=c, epochs=streak[c]))
        return out

    @staticmethod
    def needs_rollback(events: list[Event]) -> bool:
        return any(e.kind in ("nan_loss", "loss_spike") for e in events)

    # ---- recoveries ----------------------------------------------------------------------------------
    def recover(self, reason: str) -> list[Event]:
        """After a NaN or a spike: rollback + LR backoff, or (past max_recoveries) fall back to a simpler variant."""
        self.recoveries += 1
        out = [self.record("rollback", reason=reason, recovery=self.recoveries)]
        if self.recoveries > self.cfg.max_recoveries:
            self.fallbacks += 1
            self.recoveries = 0
            self.lr_scale = 1.0
            self.loss_ema = None
            self.phase_steps = 0
            out.append(self.record("fallback_variant", variant=self.cfg.fallback_variant, reason=reason,
                                  fallbacks=self.fallbacks))
        else:
            old = self.lr_scale
            self.lr_scale *= self.cfg.lr_backoff
            out.append(self.record("lr_backoff", lr_scale_before=old, lr_scale=self.lr_scale))
        return out

    def on_oom(self, error: BaseException) -> list[Event]:
        """Halve the batch, double accumulation. Raises the error again when the batch is already 1."""
        if self.batch_size <= 1:
            raise error
        before = (self.batch_size, self.grad_accum)
        self.batch_size = max(1, self.batch_size // 2)
        self.grad_accum *= 2
        return [self.record("oom", batch_before=before[0], accum_before=before[1], batch=self.batch_size,
                           accum=self.grad_accum, error=str(error)[:200]),
                self.record("rollback", reason="oom", recovery=self.recoveries)]

    # ---- checkpoints ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch, "step": self.step, "lr_scale": self.lr_scale, "recoveries": self.recoveries,
            "fallbacks": self.fallbacks, "batch_size": self.batch_size, "grad_accum": self.grad_accum,
            "prev_train_loss": self.prev_train_loss, "loss_ema": self.loss_ema, "phase_steps": self.phase_steps,
            "collapse_streak": {k: list(v) for k, v in self.collapse_streak.items()},
            "events": [e.to_dict() for e in self.events],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("epoch", "step", "lr_scale", "recoveries", "fallbacks", "batch_size", "grad_accum",
                    "prev_train_loss", "loss_ema", "phase_steps"):
            setattr(self, key, state[key])
        self.collapse_streak = {k: list(v) for k, v in state["collapse_streak"].items()}
        self.events = [Event(**e) for e in state["events"]]
