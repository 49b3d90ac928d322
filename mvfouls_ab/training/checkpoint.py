"""Atomic checkpoints and the random-number state of a run.

A checkpoint is one torch file holding plain state dicts (model, optimizer, scheduler, guard, phase data, RNGs,
history, best-so-far). It is written to a temporary file in the same folder and moved into place with
os.replace, so a run killed mid-write leaves the previous checkpoint intact.
"""
from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import MVFoulsError, located

LAST = "last.pt"
BEST = "best.pt"


def save_atomic(obj: Any, path: Path) -> Path:
    """torch.save to a temp file next to `path`, then os.replace (atomic on POSIX)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)   # no fsync: the rename protects against a killed process, which is what we resume from
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - a truncated or foreign file, reported as a user error
        raise MVFoulsError(located(path, f"cannot read checkpoint ({exc.__class__.__name__}: {exc})",
                                   "delete the run folder's checkpoints/ or start with resume disabled")) from None


def rng_state(generator: torch.Generator, np_rng: np.random.Generator) -> dict[str, Any]:
    """Every random source a run draws from: torch (CPU and CUDA), numpy, python, and the run's generators."""
    state = {
        "torch": torch.get_rng_state(),
        "numpy_global": np.random.get_state(),
        "python": random.getstate(),
        "generator": generator.get_state(),
        "np_rng": np_rng.bit_generator.state,
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any], generator: torch.Generator, np_rng: np.random.Generator) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy_global"])
    random.setstate(state["python"])
    generator.set_state(state["generator"])
    np_rng.bit_generator.state = state["np_rng"]
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def cpu_state_dict(module_or_optim: Any) -> dict[str, Any]:
    """A detached CPU copy of a state dict (for in-memory rollback snapshots and best-so-far)."""
    def copy(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            return v.detach().to("cpu", copy=True)
        if isinstance(v, dict):
            return {k: copy(x) for k, x in v.items()}
        if isinstance(v, list):
            return [copy(x) for x in v]
        return v
    return copy(module_or_optim.state_dict())
