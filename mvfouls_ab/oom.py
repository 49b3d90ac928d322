"""Out of memory anywhere in a trial: degrade before failing.

:func:`degrade` runs ``fn(batch_size, device)``; on an out-of-memory error it frees the CUDA cache and tries again
with half the batch, down to ``min_batch``, then once more on the CPU; only an OOM on the CPU at ``min_batch`` is
raised. Each step down is reported to ``on_event(kind, detail)`` (the trainer records it as a stability event), so
a run says what it gave up. For every pass that only reads the model (validation, curriculum scoring, the final
prediction, feature extraction); the training step has its own path (StabilityGuard.on_oom: half the batch, twice
the gradient accumulation, the same effective batch).

    logits = degrade(lambda bs, dev: predict(model.to(dev), source, batch=bs, device=dev), EVAL_BATCH, device,
                     on_event=guard.record)
"""
from __future__ import annotations

import gc
from collections.abc import Callable
from typing import Any, TypeVar

import torch

T = TypeVar("T")


def is_oom(exc: BaseException) -> bool:
    """torch's OutOfMemoryError, or a RuntimeError that says it ran out of memory (cuDNN, MPS, older torch)."""
    return isinstance(exc, torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower())


def free_memory(device: torch.device | str | None = None) -> None:
    gc.collect()
    if torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda"):
        torch.cuda.empty_cache()


def degrade(fn: Callable[[int, torch.device], T], batch_size: int, device: torch.device | str,
            min_batch: int = 1, on_event: Callable[..., Any] | None = None, what: str = "evaluation") -> T:
    """``fn(batch_size, device)``, retried with half the batch on OOM, then on the CPU (see the module docstring)."""
    device = torch.device(device)
    batch = max(int(batch_size), 1)
    while True:
        try:
            return fn(batch, device)
        except Exception as exc:
            if not is_oom(exc):
                raise
            free_memory(device)
            if batch > min_batch:
                new = max(min_batch, batch // 2)
                _report(on_event, "oom_eval_batch", what=what, device=str(device), batch_before=batch, batch=new)
                batch = new
            elif device.type != "cpu":
                _report(on_event, "oom_eval_cpu", what=what, device_before=str(device), device="cpu", batch=batch)
                device = torch.device("cpu")
                batch = max(int(batch_size), 1)        # the CPU has room for the full batch again
            else:
                raise


def _report(on_event: Callable[..., Any] | None, kind: str, **detail: Any) -> None:
    if on_event is not None:
        on_event(kind, **detail)
