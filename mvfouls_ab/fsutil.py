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

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from .errors import MVFoulsError, located

RUN_MARKER = ".mvfouls_run"


def atomic_write(path: Path | str, data: str | bytes | Callable[[IO[bytes]], Any], *, fsync: bool = False,
                 mode: int | None = None) -> Path:
    """Write ``data`` (text, bytes, or a function that writes to a binary file object) to ``path`` atomically.

    ``fsync``: also flush to the disk before the rename (survives a power cut, not only a killed process).
    ``mode``: permission bits of the new file (e.g. 0o600 for files holding secrets), set before it is visible.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        if mode is not None:
            os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode("utf-8") if isinstance(data, str) else data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_jsonl(path: Path | str, rows: list[Any], default: Callable[[Any], Any] | None = str) -> Path:
    """One JSON document per line, the whole file replaced at once (appends are not atomic for readers)."""
    return atomic_write(path, "".join(json.dumps(r, default=default) + "\n" for r in rows))


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
