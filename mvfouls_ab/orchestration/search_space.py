"""The study's search space: YAML with ``fixed`` TrainingConfig values and ``params`` to suggest (categorical | int |
float, optionally ``when`` another parameter has given values). The default is experiments/search_space.yaml (the
only copy; experiments/search_space_gpu.yaml for ``--profile gpu``)."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from ..config import FIELD_TYPES, TrainingConfig, coerce
from ..errors import ConfigError, StudyError, located

if TYPE_CHECKING:
    import optuna


SEARCH_SPACE_FILE = "search_space.yaml"
# A profile's own default search space (--search-space overrides it); the other profiles use SEARCH_SPACE_FILE.
PROFILE_SEARCH_SPACES: dict[str, str] = {"gpu": "search_space_gpu.yaml"}
_SPEC_KEYS = {"categorical": {"choices"}, "int": {"low", "high", "step", "log"},
              "float": {"low", "high", "step", "log"}}


def default_file(profile: str | None = None) -> Path:
    """experiments/<the profile's search space> of the source checkout, else of the working directory (the Docker
    image's /app)."""
    name = PROFILE_SEARCH_SPACES.get(profile or "", SEARCH_SPACE_FILE)
    candidates = [Path(__file__).resolve().parents[2] / "experiments" / name, Path.cwd() / "experiments" / name]
    return next((p for p in candidates if p.is_file()), candidates[0])


def validate_search_space(space: Any, source: str = "search space") -> dict[str, Any]:
    """Check every key against TrainingConfig and every distribution; return {'fixed': {...}, 'params': {...}}."""
    if not isinstance(space, dict):
        raise StudyError(located(source, "top level must be a mapping with 'fixed' and 'params'",
                                 "see experiments/search_space.yaml"))
    space = {k: v for k, v in space.items() if k != "description"}
    extra = set(space) - {"fixed", "params"}
    if extra:
        raise StudyError(located(source, f"unknown top-level key(s) {', '.join(sorted(extra))}",
                                 "use only 'fixed' and 'params' (and 'description')"))
    fixed = dict(space.get("fixed") or {})
    params = dict(space.get("params") or {})
    for name in list(fixed) + list(params):
        if name not in FIELD_TYPES:
            raise StudyError(located(source, f"unknown search-space key {name!r} (not a TrainingConfig field)",
                                     "use TrainingConfig field names, e.g. phase1_lr, max_weight_phase2, variant"))
    try:
        fixed = {k: coerce(k, v, source) for k, v in fixed.items()}
    except ConfigError as exc:
        raise StudyError(str(exc)) from None
    seen: list[str] = []
    for name, spec in params.items():
        where = f"{source}, params.{name}"
        if not isinstance(spec, dict) or spec.get("type") not in _SPEC_KEYS:
            raise StudyError(located(where, "needs type: categorical | int | float",
                                     "write e.g. {type: float, low: 1e-4, high: 1e-2, log: true}"))
        kind = spec["type"]
        unknown = set(spec) - _SPEC_KEYS[kind] - {"type", "when"}
        if unknown:
            raise StudyError(located(where, f"unknown option(s) {', '.join(sorted(unknown))} for type {kind}",
                                     f"use {', '.join(sorted(_SPEC_KEYS[kind] | {'when'}))}"))
        if kind == "categorical":
            choices = spec.get("choices")
            if not isinstance(choices, list) or not choices:
                raise StudyError(located(where, "categorical needs a non-empty 'choices' list", "add choices: [...]"))
            try:
                for c in choices:
                    coerce(name, c, where)
            except ConfigError as exc:
                raise StudyError(str(exc)) from None
        else:
            if "low" not in spec or "high" not in spec or not spec["low"] <= spec["high"]:
                raise StudyError(located(where, "needs numeric low <= high", "write low: A, high: B"))
        for key in (spec.get("when") or {}):
            if key not in seen:
                raise StudyError(located(where, f"'when' refers to {key!r}, which is not suggested before it",
                                         "list the parameter it depends on earlier in params"))
        seen.append(name)
    return {"fixed": fixed, "params": params}


def load_search_space(path: str | Path | None) -> dict[str, Any]:
    """The YAML file's space (None: experiments/search_space.yaml)."""
    p = Path(path) if path is not None else default_file()
    if not p.is_file():
        raise StudyError(located(p, "search-space file not found", "pass an existing YAML, e.g. "
                                 "experiments/search_space.yaml"))
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise StudyError(located(p, f"not valid YAML ({exc})", "fix the YAML syntax")) from None
    return validate_search_space(data, str(p))


def suggest(trial: optuna.Trial, space: dict[str, Any], base: TrainingConfig | None = None) -> dict[str, Any]:
    """TrainingConfig overrides for one trial: fixed values, then each parameter whose 'when' holds."""
    base = base or TrainingConfig()
    values = dict(space["fixed"])
    for name, spec in space["params"].items():
        cond = spec.get("when") or {}
        if any(values.get(k, getattr(base, k)) not in (v if isinstance(v, list) else [v])
               for k, v in cond.items()):
            continue
        kind = spec["type"]
        if kind == "categorical":
            values[name] = trial.suggest_categorical(name, spec["choices"])
        elif kind == "int":
            values[name] = trial.suggest_int(name, int(spec["low"]), int(spec["high"]), step=int(spec.get("step", 1)),
                                             log=bool(spec.get("log", False)))
        else:
            values[name] = trial.suggest_float(name, float(spec["low"]), float(spec["high"]),
                                               step=spec.get("step"), log=bool(spec.get("log", False)))
    return values


def max_epochs(space: dict[str, Any], base: TrainingConfig) -> int:
    """Largest total number of epochs a trial of this space can run (the Hyperband max resource)."""
    total = 0
    for i in (1, 2, 3):
        key = f"phase{i}_epochs"
        spec = space["params"].get(key)
        total += int(spec["high"]) if spec and spec["type"] == "int" else int(space["fixed"].get(key, getattr(base, key)))
    return total

