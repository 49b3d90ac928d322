"""The MLflow model of a run: everything prediction needs, as an MLflow ``pyfunc`` model.

A *pack* is a folder (the pyfunc's one artifact, ``pack``) holding:

  pack.json          what the model is: the TrainingConfig, the backbone reference (name, code version, weights id,
                     output dim), the frame window, the feature-cache key recipe, the post-hoc taus and the Train
                     class counts they adjust with, the class maps, the video size of the training data, provenance
  member_<i>.pt      the head weights of each ensemble member (the trainer's best checkpoints; with the backbone in
                     end_to_end mode), loaded with torch's weights-only unpickler
  backbone.pt        the backbone weights the features came from (a learned or local file; torchvision DEFAULT
                     weights are taken from the checkpoint); absent for seeded random ("none") backbones
  feature_norm.pt    the Train mean/std the per-view features were standardized with (frozen/learned modes)
  config.yaml        the TrainingConfig, for people

Prediction (``ModelPack.predict``) goes clips -> decode (the clip cache) -> backbone (the feature cache, keyed like
training's, so a data set the run saw reuses its cached features) -> standardize -> each member's head -> mean of
the members' logits -> post-hoc logit adjustment with the run's taus -> argmax, i.e. the trainer's own final
prediction, and fails with a ``ModelPackError`` (not a shape error deep in torch) when the model and the data or
the installed code do not match: a backbone of another code version, features of another size, clips of another
video release than the model was trained on.

The pyfunc (``MVFoulsPyfunc``) takes a DataFrame of ``action_id`` and ``clips`` (a list of mp4 paths per action)
and returns the official strings per action; ``python -m mvfouls_ab.predict`` wraps it for a data root and writes
the official prediction file.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import MVFoulsError, located
from .fsutil import atomic_write, json_default
from .labels import ACTION_CLASSES, SEVERITY_CLASSES, SEVERITY_PREDICTION_STRINGS, TASKS

PACK_VERSION = 1
MODEL_NAME = "model"                 # the logged model's name in its run (runs:/<id>/model)
LOCAL_MODEL_DIR = "mlflow_model"     # the pyfunc model saved in a run folder (predict --model RUN_DIR)
CHAMPION_ALIAS = "champion"


class ModelPackError(MVFoulsError):
    """A logged model that cannot predict on the given data (mismatch, missing file, unknown model URI)."""


def registered_name(study: str) -> str:
    return f"mvfouls-{study}"


# ---- what a run hands over -----------------------------------------------------------------------------------
@dataclass
class PackSpec:
    cfg: Any                                        # TrainingConfig
    members: list[Path]                             # checkpoint files: {"model", "variant", "complexity"}
    backbone_weights: str                           # local file, "none" or "DEFAULT"
    feature_norm: dict[str, Any] | None             # {"mean": tensor[D], "std": tensor[D]} or None
    taus: dict[str, float]
    train_counts: dict[str, list[int]]
    video: dict[str, int] | None = None             # {"width", "height"} of the training clips
    source: dict[str, Any] = field(default_factory=dict)   # provenance: study, trial, run_dir, data fingerprint


def probe_video(path: Path | str) -> dict[str, int] | None:
    """{"width", "height"} of a clip's video stream (None when it cannot be read)."""
    import av

    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            return {"width": int(stream.codec_context.width), "height": int(stream.codec_context.height)}
    except Exception:  # noqa: BLE001 - a clip we cannot read is reported by the loader, not here
        return None


def spec_from_result(cfg: Any, result: Any, data: Any, source: dict[str, Any] | None = None) -> PackSpec:
    """The pack of a finished Trainer run (RunResult.extras: backbone_weights, feature_norm, ensemble)."""
    extras = dict(getattr(result, "extras", None) or {})
    members = [Path(p) for p in (extras.get("ensemble") or [result.checkpoint])]
    weights = str(extras.get("backbone_weights") or cfg.weights or "none")
    norm = extras.get("feature_norm", "missing")
    if isinstance(norm, str):              # a trainer that does not hand it over: Train's statistics, as it computes
        norm = _train_feature_norm(cfg, data) if cfg.feature_mode != "end_to_end" else None
    counts = extras.get("train_counts") or {t: [int(c) for c in data.train.class_counts(t)] for t in TASKS}
    first = data.train.actions[0].clips[0].path if len(data.train) else None
    return PackSpec(cfg, members, weights, norm, {t: float(result.taus[t]) for t in TASKS},
                    {t: [int(c) for c in counts[t]] for t in TASKS}, probe_video(first) if first else None,
                    dict(source or {}))


def _train_feature_norm(cfg: Any, data: Any) -> dict[str, Any]:

    from .models.features import load_features

    fs = load_features(cfg, data.train, data.cache, progress=False)
    views = fs.feats[fs.view_mask]
    return {"mean": views.mean(dim=0), "std": views.std(dim=0).clamp_min(1e-6)}


def class_prior(counts: list[int] | np.ndarray) -> np.ndarray:
    """Train's class prior, Laplace-smoothed (a class absent from Train gets a finite adjustment): the trainer's."""
    c = np.asarray(counts)
    return (c + 1.0) / (c.sum() + len(c))


# ---- writing a pack --------------------------------------------------------------------------------------------
def _file_sha1(path: Path) -> str:
    digest = hashlib.sha1()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def build_pack(spec: PackSpec, dest: Path) -> Path:
    """Write the pack folder `dest` (replaced if it exists); returns it."""
    import torch
    import yaml

    from . import __version__
    from .data.video import ClipWindow
    from .models.backbones import BACKBONE_VERSION
    from .models.features import weights_id
    from .training import checkpoint as ckpt

    cfg = spec.cfg
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    end_to_end = cfg.feature_mode == "end_to_end"
    members, dim = [], None
    for i, path in enumerate(spec.members):
        saved = ckpt.load(Path(path))
        state = {k: v for k, v in saved["model"].items() if end_to_end or not k.startswith("backbone.")}
        if spec.backbone_weights == "DEFAULT" and i == 0 and not end_to_end:
            torch.save({k.removeprefix("backbone."): v for k, v in saved["model"].items() if k.startswith("backbone.")},
                       dest / "backbone.pt")
        name = f"member_{i}.pt"
        torch.save({"model": state, "variant": saved["variant"], "complexity": int(saved["complexity"])}, dest / name)
        members.append({"file": name, "variant": saved["variant"], "complexity": int(saved["complexity"]),
                        "epoch": saved.get("epoch")})
    kind = spec.backbone_weights if spec.backbone_weights in ("none", "DEFAULT") else "file"
    if kind == "file":
        shutil.copyfile(Path(spec.backbone_weights).expanduser(), dest / "backbone.pt")
    if spec.feature_norm is not None:
        mean, std = spec.feature_norm["mean"], spec.feature_norm["std"]
        torch.save({"mean": torch.as_tensor(mean).float().cpu(), "std": torch.as_tensor(std).float().cpu()},
                   dest / "feature_norm.pt")
        dim = int(torch.as_tensor(mean).numel())
    window = ClipWindow.from_config(cfg)
    backbone = {"name": cfg.backbone, "version": BACKBONE_VERSION, "weights": kind,
                "weights_id": weights_id(spec.backbone_weights),
                "file_sha1": _file_sha1(dest / "backbone.pt") if (dest / "backbone.pt").is_file() else None,
                "feature_dim": dim}
    recipe = {"backbone": cfg.backbone, "backbone_version": BACKBONE_VERSION, "weights": backbone["weights_id"],
              "window": window.key(), "feature_dim": dim}
    meta = {
        "pack_version": PACK_VERSION, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "mvfouls_ab_version": __version__, "config": cfg.flat(), "feature_mode": cfg.feature_mode,
        "members": members, "backbone": backbone, "window": window.key(),
        "feature_recipe": recipe, "feature_recipe_key": hashlib.sha1(json.dumps(recipe, sort_keys=True)
                                                                     .encode()).hexdigest()[:16],
        "feature_norm": "feature_norm.pt" if spec.feature_norm is not None else None,
        "taus": spec.taus, "train_counts": spec.train_counts,
        "prior": {t: class_prior(spec.train_counts[t]).tolist() for t in TASKS},
        "classes": {"action": list(ACTION_CLASSES), "severity": list(SEVERITY_CLASSES)},
        "severity_prediction_strings": [list(s) for s in SEVERITY_PREDICTION_STRINGS],
        "video": spec.video, "source": spec.source,
    }
    atomic_write(dest / "pack.json", json.dumps(meta, indent=1, default=json_default))
    atomic_write(dest / "config.yaml", yaml.safe_dump(cfg.flat(), sort_keys=False))
    return dest


# ---- the MLflow pyfunc -----------------------------------------------------------------------------------------
def _signature():
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Array, ColSpec, ParamSchema, ParamSpec, Schema

    inputs = Schema([ColSpec("string", "action_id"), ColSpec(Array("string"), "clips")])
    outputs = Schema([ColSpec("string", "action_id"), ColSpec("string", "action_class"),
                      ColSpec("string", "offence"), ColSpec("string", "severity"),
                      ColSpec("long", "action_index"), ColSpec("long", "severity_index")])
    params = ParamSchema([ParamSpec("split", "string", "input"), ParamSpec("data_root", "string", ""),
                          ParamSpec("cache_dir", "string", ""), ParamSpec("device", "string", "auto"),
                          ParamSpec("check_video", "boolean", True)])
    return ModelSignature(inputs=inputs, outputs=outputs, params=params)


def _pip_requirements() -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for name in ("torch", "torchvision", "av", "numpy", "pandas", "pyyaml", "mlflow"):
        try:
            out.append(f"{name}=={version(name).split('+')[0]}")
        except PackageNotFoundError:
            out.append(name)
    return out


def save_pyfunc(spec: PackSpec, path: Path) -> Path:
    """Save the run's pyfunc model at `path` (replaced if it exists): the pack as its artifact, a signature with
    params, an input example, explicit requirements (no environment inference: it would load the model again)."""
    import mlflow.pyfunc
    import pandas as pd

    from . import __version__

    path = Path(path)
    if path.exists():
        shutil.rmtree(path)
    with tempfile.TemporaryDirectory(prefix="mvfouls-pack-") as tmp:
        pack = build_pack(spec, Path(tmp) / "pack")
        example = pd.DataFrame({"action_id": ["0"], "clips": [["Test/action_0/clip_0.mp4",
                                                                "Test/action_0/clip_1.mp4"]]})
        with _Quiet():
            mlflow.pyfunc.save_model(str(path), python_model=MVFoulsPyfunc(), artifacts={"pack": str(pack)},
                                     signature=_signature(), input_example=example,
                                     pip_requirements=_pip_requirements(),
                                     metadata={"mvfouls_ab_version": __version__, "task": "SoccerNet MVFouls",
                                               "requires": "the mvfouls_ab package (pip install -e . of mvfouls-ab)",
                                               **{k: str(v) for k, v in spec.source.items()}})
    return path


class _Quiet:
    """MLflow's notes while saving a model (the pickling warning, the example's validation, artifact bars) off."""

    def __enter__(self) -> None:
        import logging

        self.loggers = [logging.getLogger(n) for n in ("mlflow.pyfunc", "mlflow.models", "mlflow.utils")]
        self.levels = [lg.level for lg in self.loggers]
        for lg in self.loggers:
            lg.setLevel(logging.ERROR)
        self.bar = os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
        os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"

    def __exit__(self, *exc: object) -> None:
        for lg, level in zip(self.loggers, self.levels):
            lg.setLevel(level)
        if self.bar is None:
            os.environ.pop("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", None)
        else:
            os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = self.bar


def _pyfunc_base():
    import mlflow.pyfunc

    return mlflow.pyfunc.PythonModel


class MVFoulsPyfunc(_pyfunc_base()):
    """pyfunc: DataFrame(action_id, clips) -> DataFrame(action_id, action_class, offence, severity, indices)."""

    # No type-hint-based validation (MLflow warns about the missing hints otherwise): the model is saved with an
    # explicit signature, which MLflow enforces on the input.
    _skip_type_hint_validation = True

    def load_context(self, context) -> None:
        self.pack = ModelPack.load(Path(context.artifacts["pack"]))

    def predict(self, context, model_input, params: dict[str, Any] | None = None):
        return _predict_frame(self.pack, model_input, params)


def _predict_frame(pack: ModelPack, model_input: Any, params: dict[str, Any] | None = None):
    import pandas as pd

    params = dict(params or {})
    frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
    missing = {"action_id", "clips"} - set(frame.columns)
    if missing:
        raise ModelPackError(located("model input", f"missing column(s) {', '.join(sorted(missing))}",
                                     "pass a DataFrame with action_id and clips (a list of mp4 paths)"))
    root = Path(params.get("data_root") or ".")
    actions = []
    for aid, clips in zip(frame["action_id"], frame["clips"]):
        paths = [Path(c) if Path(c).is_absolute() else root / c for c in list(clips)]
        actions.append(_action(str(aid), paths))
    out = pack.predict(actions, split=str(params.get("split") or "input"), root=root,
                       cache_dir=str(params.get("cache_dir") or ""), device=str(params.get("device") or "auto"),
                       check_video=bool(params.get("check_video", True)))
    return out.frame()


def _action(action_id: str, paths: list[Path]):
    from .data.annotations import Action, Clip

    clips = tuple(Clip(url=str(p), path=Path(os.path.abspath(p)), camera_type="", replay_speed=None, timestamp=None)
                  for p in paths)
    return Action(action_id, None, None, {}, clips)


# ---- loading and predicting ------------------------------------------------------------------------------------
@dataclass
class Prediction:
    action_ids: list[str]
    logits: dict[str, np.ndarray]             # task -> final (adjusted) logits [N, classes]

    @property
    def classes(self) -> dict[str, np.ndarray]:
        return {t: self.logits[t].argmax(1) for t in TASKS}

    def frame(self):
        import pandas as pd

        from .labels import prediction_entry

        cls = self.classes
        rows = []
        for aid, a, s in zip(self.action_ids, cls["action"], cls["severity"]):
            entry = prediction_entry(int(a), int(s))
            rows.append({"action_id": aid, "action_class": entry["Action class"], "offence": entry["Offence"],
                         "severity": entry["Severity"], "action_index": int(a), "severity_index": int(s)})
        return pd.DataFrame(rows, columns=["action_id", "action_class", "offence", "severity", "action_index",
                                           "severity_index"])


class ModelPack:
    """A pack folder loaded for prediction."""

    def __init__(self, root: Path, meta: dict[str, Any]) -> None:
        from .config import TrainingConfig

        self.root, self.meta = root, meta
        self.cfg = TrainingConfig(**{k: v for k, v in meta["config"].items()
                                     if k in TrainingConfig.__dataclass_fields__})
        self.taus = {t: float(meta["taus"][t]) for t in TASKS}
        self.prior = {t: class_prior(meta["train_counts"][t]) for t in TASKS}

    @classmethod
    def load(cls, root: Path) -> ModelPack:
        path = Path(root) / "pack.json"
        if not path.is_file():
            raise ModelPackError(located(root, "not a model pack (no pack.json)",
                                         "pass a model logged by mvfouls-ab (a trial's or train's run)"))
        meta = json.loads(path.read_text())
        if meta.get("pack_version") != PACK_VERSION:
            raise ModelPackError(located(path, f"pack version {meta.get('pack_version')} is not {PACK_VERSION}",
                                         "predict with the mvfouls-ab version that logged the model"))
        return cls(Path(root), meta)

    # -- checks ---------------------------------------------------------------------------------------------
    def check_code(self) -> None:
        """The installed backbone code must be the one the model was trained with."""
        from .models.backbones import BACKBONE_NAMES, BACKBONE_VERSION

        b = self.meta["backbone"]
        if b["name"] not in BACKBONE_NAMES:
            raise ModelPackError(located(self.root, f"backbone {b['name']!r} is unknown to this mvfouls_ab",
                                         "install the mvfouls-ab version that logged the model"))
        if str(b["version"]) != str(BACKBONE_VERSION):
            raise ModelPackError(located(self.root, f"feature key mismatch: the model's features come from "
                                         f"{b['name']} backbone version {b['version']}, the installed code builds "
                                         f"version {BACKBONE_VERSION}",
                                         "install the mvfouls-ab version that logged the model, or retrain"))
        if b.get("file_sha1") and _file_sha1(self.root / "backbone.pt") != b["file_sha1"]:
            raise ModelPackError(located(self.root / "backbone.pt", "backbone weights differ from the ones logged "
                                         "with the model (damaged or replaced file)", "download the model again"))

    def check_video(self, actions: list[Any]) -> None:
        """The clips must come from the video release the model was trained on (same frame size)."""
        want = self.meta.get("video")
        if not want or not actions:
            return
        clip = actions[0].clips[0].path
        got = probe_video(clip)
        if got is not None and got != want:
            raise ModelPackError(located(clip, f"feature key mismatch: the model was trained on "
                                         f"{want['width']}x{want['height']} clips, this data has "
                                         f"{got['width']}x{got['height']} (another release, e.g. 720p vs 224p)",
                                         "predict on the release the model was trained on (python -m "
                                         "mvfouls_ab.download --version ...), or pass --ignore-video-size"))

    # -- the pipeline ---------------------------------------------------------------------------------------
    def _members(self, device: Any) -> list[Any]:
        import torch

        from .models.variants import build_model, has_levels, set_complexity

        models = []
        end_to_end = self.cfg.feature_mode == "end_to_end"
        for m in self.meta["members"]:
            saved = torch.load(self.root / m["file"], map_location="cpu", weights_only=True)
            cfg = self.cfg.replace(variant=m["variant"], complexity_level=int(m["complexity"]), weights="none")
            model = build_model(cfg)
            if has_levels(model):
                set_complexity(model, int(m["complexity"]))
            missing, unexpected = model.load_state_dict(saved["model"], strict=False)
            missing = [k for k in missing if end_to_end or not k.startswith("backbone.")]
            if missing or unexpected:
                raise ModelPackError(located(self.root / m["file"], f"head weights do not fit the "
                                             f"{m['variant']} head built from the pack's config ({len(missing)} "
                                             f"missing, {len(unexpected)} unexpected keys, e.g. "
                                             f"{(missing + unexpected)[:2]})",
                                             "install the mvfouls-ab version that logged the model"))
            models.append(model.to(device).eval())
        return models

    def _feature_cfg(self, cache_dir: str):
        """(config whose weights give the training run's feature-cache key, config that computes them here)."""
        kind = self.meta["backbone"]["weights"]
        bundled = str(self.root / "backbone.pt")
        base = self.cfg.replace(cache_dir=cache_dir or "", data_root="")
        if kind == "none":
            return base.replace(weights="none"), base.replace(weights="none")
        if kind == "DEFAULT":
            return base.replace(weights="DEFAULT"), base.replace(weights=bundled)
        return base.replace(weights=bundled), base.replace(weights=bundled)

    def features(self, split: Any, cache: Any, cache_dir: str, progress: bool) -> tuple[Any, Any]:
        """Per-view features [N, V, D] and view mask of `split`: the feature cache when it holds them (the run's
        own, for data it trained on), else computed with the pack's backbone and cached."""
        import torch

        from .models.features import _load, feature_key, feature_path, load_features

        key_cfg, compute_cfg = self._feature_cfg(cache_dir)
        loaded = None
        if key_cfg is not compute_cfg and key_cfg.weights != compute_cfg.weights:
            key, _ = feature_key(key_cfg, split)
            loaded = _load(feature_path(cache, key, split.split), [a.action_id for a in split.actions])
        if loaded is not None:
            feats, mask = (torch.from_numpy(np.ascontiguousarray(loaded[0], np.float32)),
                           torch.from_numpy(loaded[1].astype(bool)))
        else:
            fs = load_features(compute_cfg, split, cache, progress=progress)
            feats, mask = fs.feats, fs.view_mask
        want = self.meta["backbone"].get("feature_dim")
        if want is not None and int(feats.shape[-1]) != int(want):
            raise ModelPackError(located(self.root, f"feature key mismatch: the heads take {want}-d features, the "
                                         f"{self.cfg.backbone} features of this data are {int(feats.shape[-1])}-d",
                                         "predict with the backbone the model was trained with (install the "
                                         "mvfouls-ab version that logged it)"))
        return feats, mask

    def predict(self, actions: list[Any], split: str = "input", root: Path | str = ".", cache_dir: str = "",
                device: str = "auto", check_video: bool = True, progress: bool = True) -> Prediction:
        """The trainer's final prediction for `actions` (Action records with their clips): the same sources and
        evaluation batches (training/sources.py), the mean of the members' logits, the post-hoc adjustment."""
        import torch

        from .data.annotations import SplitAnnotations
        from .data.dataset import ClipCache, MultiViewDataset, default_cache_dir
        from .data.video import ClipWindow
        from .training.losses import posthoc_adjust
        from .training.sources import ClipSource, FeatureSource

        self.check_code()
        if check_video:
            self.check_video(actions)
        dev = torch.device("cuda" if device == "cuda" or (device == "auto" and torch.cuda.is_available()) else "cpu")
        cfg = self.cfg.replace(cache_dir=cache_dir or "")
        sa = SplitAnnotations(split, Path(os.path.abspath(root)), list(actions), {}, len(actions))
        cache = ClipCache(default_cache_dir(cfg))
        base = {"name": split, "action_ids": [a.action_id for a in actions], "targets": sa.targets()}
        threads = torch.get_num_threads()
        if self.cfg.threads > 0:
            torch.set_num_threads(self.cfg.threads)      # the run's thread count: the same float sums
        try:
            models = self._members(dev)
            if self.cfg.feature_mode == "end_to_end":
                window = ClipWindow.from_config(self.cfg)
                cache.pack(sa.actions, window, workers=int(self.cfg.num_workers))
                src: Any = ClipSource(**base, eval_ds=MultiViewDataset(sa, window, cache, None, self.cfg.seed),
                                      num_workers=int(self.cfg.num_workers))
            else:
                feats, mask = self.features(sa, cache, cache_dir, progress)
                if self.meta.get("feature_norm"):
                    norm = torch.load(self.root / "feature_norm.pt", map_location="cpu", weights_only=True)
                    feats = ((feats - norm["mean"]) / norm["std"]).masked_fill(~mask.unsqueeze(-1), 0.0)
                src = FeatureSource(**base, feats=feats, mask=mask)
            amp = self.cfg.amp and dev.type == "cuda"
            per_model: list[dict[str, np.ndarray]] = []
            with torch.no_grad():
                for model in models:
                    outs: dict[str, list[Any]] = {t: [] for t in TASKS}
                    for forward in src.eval_batches(max(1, self.cfg.batch_size), dev):
                        with torch.autocast(dev.type, enabled=amp):
                            o = forward(model)
                        for t in TASKS:
                            outs[t].append(o[t].float().cpu())
                    per_model.append({t: torch.cat(outs[t]).numpy() for t in TASKS})
        finally:
            torch.set_num_threads(threads)
        raw = {t: np.mean([p[t] for p in per_model], axis=0) for t in TASKS}
        final = {t: np.asarray(posthoc_adjust(raw[t], self.prior[t], self.taus[t])) for t in TASKS}
        return Prediction([a.action_id for a in actions], final)


# ---- the registry ----------------------------------------------------------------------------------------------
def run_model_id(client: Any, run_id: str) -> str | None:
    """The id of the model a run logged (its MLflow 3 LoggedModel output), or None."""
    run = client.get_run(run_id)
    outputs = getattr(run, "outputs", None)
    ids = [m.model_id for m in (getattr(outputs, "model_outputs", None) or [])]
    return ids[-1] if ids else None


def register_champion(client: Any, name: str, run_id: str, tags: dict[str, Any] | None = None,
                      description: str = "") -> Any:
    """Register the run's logged model as a version of `name` and point the alias ``champion`` at it.

    A run already registered under `name` keeps its version (no duplicate); the previous champion keeps its
    version too, only the alias moves. Returns the ModelVersion."""
    model_id = run_model_id(client, run_id)
    if model_id is None:
        raise ModelPackError(located(f"run {run_id}", "logged no model", "check the run's model op in its log"))
    try:
        client.get_registered_model(name)
    except Exception:  # noqa: BLE001 - RESOURCE_DOES_NOT_EXIST (or a racing worker created it)
        try:
            client.create_registered_model(name, description=description or None,
                                           tags={"task": "SoccerNet MVFouls"})
        except Exception:  # noqa: BLE001
            client.get_registered_model(name)
    existing = [v for v in client.search_model_versions(f"name = '{name}'") if v.run_id == run_id]
    if existing:
        version = existing[0]
    else:
        # the logged model's storage location as the source: a "models:/<id>" source is resolved through the
        # process-wide tracking URI, not this client's
        source = client.get_logged_model(model_id).artifact_location
        version = client.create_model_version(name, source=source, run_id=run_id,
                                              tags={k: str(v) for k, v in (tags or {}).items()},
                                              description=description or None, model_id=model_id)
    client.set_registered_model_alias(name, CHAMPION_ALIAS, str(version.version))
    return version


def log_run_model(tracker: Any, cfg: Any, result: Any, data: Any, run_dir: Path, step: int = 0,
                  source: dict[str, Any] | None = None) -> Path | None:
    """Save the run's pyfunc model in ``run_dir/mlflow_model`` and log it to the run (in the background thread).
    A model that cannot be built is reported on the run (tag ``model_error``), not fatal to the run."""
    import logging

    try:
        spec = spec_from_result(cfg, result, data, {**(source or {}), "run_dir": str(run_dir)})
        path = save_pyfunc(spec, Path(run_dir) / LOCAL_MODEL_DIR)
    except Exception as exc:  # noqa: BLE001 - the run's metrics and files stay valid without a model
        logging.getLogger(__name__).warning("model of %s not saved: %s: %s", run_dir, type(exc).__name__, exc)
        tracker.set_tags({"model_error": f"{type(exc).__name__}: {exc}"[:4000]})
        return None
    tracker.log_model(path, MODEL_NAME, step=step, tags={k: v for k, v in (source or {}).items()})
    return path
