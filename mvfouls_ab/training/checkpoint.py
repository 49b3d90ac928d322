"""Atomic checkpoints and the random-number state of a run.

A checkpoint is one torch file holding plain state dicts (model, optimizer, scheduler, guard, phase data, RNGs,
history, best-so-far). It is written to a temporary file in the same folder and moved into place with
os.replace (fsutil.atomic_write), so a run killed mid-write leaves the previous checkpoint intact.

Loading uses ``torch.load(weights_only=True)``: checkpoints sit in a volume every worker writes to, and a full
unpickler would run whatever code a tampered file names. So only tensors and plain containers are stored: on the
way in, :func:`encode` turns numpy arrays into tensors, numpy scalars into Python numbers, Paths into strings and
the project's own record dataclasses (SAFE_DATACLASSES: DetailedMetrics, stability Event) into tagged dicts of
their fields; :func:`decode` rebuilds them on the way out, so the trainer saves and gets back the same objects.
"""
from __future__ import annotations

import dataclasses
import importlib
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import MVFoulsError, located
from ..fsutil import atomic_write

LAST = "last.pt"
BEST = "best.pt"


# The dataclasses a checkpoint may hold, by tag (module:qualname). Nothing else is rebuilt from a file.
SAFE_DATACLASSES = ("mvfouls_ab.evaluation.metrics:DetailedMetrics", "mvfouls_ab.training.stability:Event")
_MOVED = {"mvfouls_ab.metrics:DetailedMetrics": "mvfouls_ab.evaluation.metrics:DetailedMetrics"}   # older files
_TAG = "__ckpt__"


def encode(obj: Any) -> Any:
    """``obj`` with everything torch's weights-only unpickler refuses turned into tensors and tagged dicts."""
    if isinstance(obj, torch.Tensor) or obj is None or isinstance(obj, (bool, int, float, str, bytes)):
        return obj
    if isinstance(obj, dict):
        return {k: encode(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [encode(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(encode(v) for v in obj)
    if isinstance(obj, np.ndarray):
        if obj.dtype == object:
            return {_TAG: "list", "items": [encode(v) for v in obj.tolist()]}
        arr = np.ascontiguousarray(obj)
        try:
            data: Any = torch.from_numpy(arr.copy())
        except (TypeError, ValueError):          # a dtype or byte order torch has no tensor for: raw bytes
            data = arr.tobytes()
        return {_TAG: "ndarray", "dtype": arr.dtype.str, "shape": list(arr.shape), "data": data}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return {_TAG: "path", "path": str(obj)}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        name = f"{type(obj).__module__}:{type(obj).__qualname__}"
        if name not in SAFE_DATACLASSES:
            raise TypeError(f"checkpoint cannot hold {name}; add it to checkpoint.SAFE_DATACLASSES")
        return {_TAG: "dataclass", "type": name,
                "fields": {f.name: encode(getattr(obj, f.name)) for f in dataclasses.fields(obj)}}
    raise TypeError(f"checkpoint cannot hold a {type(obj).__name__}: store tensors, numpy arrays or plain values")


def decode(obj: Any) -> Any:
    """The inverse of :func:`encode`."""
    if isinstance(obj, dict):
        tag = obj.get(_TAG)
        if tag is None:
            return {k: decode(v) for k, v in obj.items()}
        if tag == "ndarray":
            data, dtype = obj["data"], np.dtype(obj["dtype"])
            arr = data.numpy() if isinstance(data, torch.Tensor) else np.frombuffer(data, dtype=dtype)
            return arr.astype(dtype, copy=True).reshape(obj["shape"])
        if tag == "list":
            return np.array([decode(v) for v in obj["items"]], dtype=object)
        if tag == "path":
            return Path(obj["path"])
        if tag == "dataclass":
            name = _MOVED.get(obj["type"], obj["type"])
            if name not in SAFE_DATACLASSES:
                raise TypeError(f"checkpoint names a class that is not allowed: {obj['type']}")
            module, _, qualname = name.partition(":")
            cls = getattr(importlib.import_module(module), qualname)
            return cls(**{k: decode(v) for k, v in obj["fields"].items()})
        raise TypeError(f"unknown checkpoint tag {tag!r}")
    if isinstance(obj, list):
        return [decode(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(decode(v) for v in obj)
    return obj


def save_atomic(obj: Any, path: Path) -> Path:
    """torch.save of encode(obj) to a temp file next to `path`, then os.replace (atomic on POSIX)."""
    payload = encode(obj)
    # no fsync: the rename protects against a killed process, which is what we resume from
    return atomic_write(path, lambda f: torch.save(payload, f))


def load(path: Path) -> dict[str, Any]:
    """A checkpoint written by save_atomic, read with the weights-only unpickler (no code runs)."""
    try:
        return decode(torch.load(path, map_location="cpu", weights_only=True))
    except Exception as exc:  # noqa: BLE001 - a truncated or foreign file, reported as a user error
        raise MVFoulsError(located(path, f"cannot read checkpoint ({exc.__class__.__name__}: {exc})",
                                   "delete the run folder's checkpoints/ (a checkpoint written before weights-only "
                                   "loading, or a damaged one) or start with resume disabled")) from None


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
