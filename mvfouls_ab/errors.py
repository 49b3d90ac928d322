"""Errors a user can cause. Each message names the file, the action id (where there is one) and the fix."""
from __future__ import annotations


class MVFoulsError(Exception):
    """Base class for every error this package raises on purpose."""


class AnnotationError(MVFoulsError):
    """annotations.json (or a prediction file) is malformed or inconsistent."""


class VideoError(MVFoulsError):
    """A clip is missing, empty, corrupt, or has no video stream."""


class ConfigError(MVFoulsError):
    """A TrainingConfig / YAML / CLI value is invalid."""


class StudyError(MVFoulsError):
    """A study, storage or tracking URI problem."""


class AnalysisError(MVFoulsError):
    """A table of A/B cells (`ab analyze --cells CELLS.csv`) that cannot be analysed as given."""


def located(path: object, message: str, fix: str, action_id: str | None = None) -> str:
    """Format an error message as: '<file>[, action <id>]: <message>. Fix: <fix>'."""
    where = f"{path}" + (f", action {action_id}" if action_id is not None else "")
    return f"{where}: {message}. Fix: {fix}"
