"""Where a run comes from: the standard MLflow context tags, the git commit, a fingerprint of the data set."""
from __future__ import annotations

import functools
import hashlib
import logging
import subprocess
from pathlib import Path

log = logging.getLogger(__name__)

@functools.cache
def context_tags() -> dict[str, str]:
    """MLflow's standard run tags for this process (``mlflow.user``, ``mlflow.source.name``/``type`` and, inside a
    git checkout, ``mlflow.source.git.commit``/``repoURL``/``branch``), as ``mlflow.start_run`` sets them; our runs
    are created with MlflowClient, which does not. Resolved once per process."""
    try:
        from mlflow.tracking.context.registry import resolve_tags

        tags = {k: str(v) for k, v in resolve_tags({}).items()}
    except Exception as exc:  # noqa: BLE001 - tags are a nicety: never fail a run for them
        log.info("MLflow context tags unavailable: %s", exc)
        tags = {}
    if "mlflow.source.git.commit" not in tags:    # the entry point is outside the checkout (pytest, a notebook)
        commit = git_commit()
        if commit != "unknown":
            tags["mlflow.source.git.commit"] = commit
    return tags


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=5, check=False)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def data_fingerprint(root: Path | str) -> str:
    """Short content hash of the split annotation files (which data a run saw)."""
    h = hashlib.sha1()
    for split in ("Train", "Valid", "Test"):
        p = Path(root) / split / "annotations.json"
        if p.is_file():
            h.update(split.encode())
            h.update(p.read_bytes())
    return h.hexdigest()[:12]
