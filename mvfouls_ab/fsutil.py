"""Files other processes read: written atomically, and run folders the project may delete.

Atomic writes: :func:`atomic_write` writes to a uniquely named temporary file in the target's folder and moves it
into place with ``os.replace``, so a reader (another worker, the study's retry, a dashboard) sees the old file or
the new one, never half of one; two writers never share a temporary file. Every file another process reads goes
through it: checkpoints (training/checkpoint.py), metrics.jsonl and events.jsonl, leaderboard.csv, the MLflow spill
file, tracking/stack.py's state.json.

Run folders: a folder the project made for a run holds the marker file ``.mvfouls_run``. ``--fresh`` (and a study
reusing a trial folder) deletes a folder only when it carries the marker; anything else is a clear error that names
the folder and leaves it untouched.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any

import numpy as np

from .errors import MVFoulsError, located

RUN_MARKER = ".mvfouls_run"


@contextlib.contextmanager
def atomic_path(path: Path | str, *, mode: int | None = None) -> Iterator[Path]:
    """A uniquely named temporary path next to ``path`` for a writer that needs a file name (an encoder, np.save
    with a suffix); moved onto ``path`` when the block ends without an error, removed otherwise.

    ``mode``: permission bits of the new file (e.g. 0o600 for files holding secrets), set before it is visible;
    by default those of a file made with open() (0o666 less the umask), not mkstemp's 0o600.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode is None:
        mode = 0o666 & ~_UMASK
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    tmp = Path(name)
    try:
        os.fchmod(fd, mode)
        os.close(fd)
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _read_umask() -> int:
    current = os.umask(0o022)
    os.umask(current)
    return current


_UMASK = _read_umask()      # read once, at import: os.umask is process-wide, not thread-safe


def atomic_write(path: Path | str, data: str | bytes | Callable[[IO[bytes]], Any], *, fsync: bool = False,
                 mode: int | None = None) -> Path:
    """Write ``data`` (text, bytes, or a function that writes to a binary file object) to ``path`` atomically.

    ``fsync``: also flush to the disk before the rename (survives a power cut, not only a killed process).
    ``mode``: permission bits of the new file (e.g. 0o600 for files holding secrets), set before it is visible.
    """
    with atomic_path(path, mode=mode) as tmp, open(tmp, "wb") as f:
        if callable(data):
            data(f)
        else:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
        if fsync:
            f.flush()
            os.fsync(f.fileno())
    return Path(path)


def atomic_write_jsonl(path: Path | str, rows: list[Any], default: Callable[[Any], Any] | None = None) -> Path:
    """One JSON document per line, the whole file replaced at once (appends are not atomic for readers)."""
    return atomic_write(path, "".join(json.dumps(r, default=default or json_default) + "\n" for r in rows))


def jsonable(value: Any, finite: bool = False) -> Any:
    """``value`` as plain JSON types, the one normaliser: numpy scalars and arrays, tuples, Paths and mappings
    (keys as strings) become their JSON equivalents, recursively. ``finite``: NaN and infinities become None (strict
    JSON). Anything else is returned as is."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v, finite) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v, finite) for v in value]
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist(), finite)
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, Path):
        return str(value)
    if finite and isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def json_default(value: Any) -> Any:
    """``json.dumps(..., default=json_default)``: :func:`jsonable`, and ``str()`` of anything it leaves as is."""
    plain = jsonable(value)
    return str(value) if plain is value else plain


# ---- run folders --------------------------------------------------------------------------------------------
def mark_run_folder(folder: Path | str, kind: str = "run") -> Path:
    """Create ``folder`` (if needed) and its marker: from now on the project may delete it (--fresh)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    marker = folder / RUN_MARKER
    if not marker.is_file():
        atomic_write(marker, json.dumps({"kind": kind, "created": time.time(), "pid": os.getpid()}) + "\n")
    return folder


def is_run_folder(folder: Path | str) -> bool:
    return (Path(folder) / RUN_MARKER).is_file()


def _legacy_run_folder(folder: Path) -> bool:
    """A run folder written before the marker existed: the trainer's config.yaml with checkpoints or metrics."""
    return (folder / "config.yaml").is_file() and ((folder / "checkpoints").is_dir()
                                                   or (folder / "metrics.jsonl").is_file())


def claim_run_folder(folder: Path | str, kind: str = "run") -> Path:
    """The folder a run writes to: a new or empty folder, or one a run made (marked, or written before markers
    existed), gets the marker; a folder holding anything else is refused (MVFoulsError, nothing written), so that
    ``--out ~`` never becomes a folder that ``--fresh`` may delete."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise MVFoulsError(located(folder, "the run folder is a file", "pass a folder for --out"))
    if folder.is_dir() and not is_run_folder(folder) and any(folder.iterdir()) and not _legacy_run_folder(folder):
        raise MVFoulsError(located(folder, "this folder holds files that no run of this tool made (no "
                                   f"{RUN_MARKER} marker), so it is not used as a run folder",
                                   "pass a new or empty folder for --out"))
    return mark_run_folder(folder, kind)


def check_removable(folder: Path | str, flag: str = "--fresh", legacy_ok: bool = False) -> None:
    """Raise MVFoulsError unless ``folder`` is absent, empty, or a run folder the project made (has the marker;
    ``legacy_ok``: or looks like one written before markers existed, for paths the caller built itself, such as a
    study's OUT/STUDY/trial_NNNN).

    Checked before anything is deleted; the folder is never touched here."""
    folder = Path(folder)
    if not folder.exists():
        return
    if folder.is_symlink() or not folder.is_dir():
        raise MVFoulsError(located(folder, f"{flag} would delete this path, which is not a run folder",
                                   "pass an --out folder that this tool created, or a new one"))
    if is_run_folder(folder) or not any(folder.iterdir()) or (legacy_ok and _legacy_run_folder(folder)):
        return
    resolved = folder.resolve()
    special = resolved in (Path.home().resolve(), Path("/"), Path.cwd().resolve()) or \
        resolved in Path.cwd().resolve().parents
    what = "your home, the working or a parent folder" if special else "files this tool did not create"
    raise MVFoulsError(located(folder, f"{flag} would delete {what} (no {RUN_MARKER} marker); left untouched",
                               "pass an --out folder that a run made (it holds .mvfouls_run), or a new folder"))


def remove_run_folder(folder: Path | str, flag: str = "--fresh", legacy_ok: bool = False) -> bool:
    """Delete a run folder the project made; refuse (MVFoulsError, folder untouched) anything else.
    Returns True if something was deleted."""
    folder = Path(folder)
    check_removable(folder, flag, legacy_ok)
    if not folder.exists():
        return False
    shutil.rmtree(folder)
    return True
