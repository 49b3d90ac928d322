"""TrainingConfig: the single source of truth for every knob a run, a study trial or an A/B arm may touch.

Plain values only (nanoGPT style). YAML files in experiments/ hold overrides; `--set key=value` on the CLI too.
`flat()` gives the dict logged as MLflow params.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError, located

FEATURE_MODES = ("frozen", "learned", "end_to_end")
RESIZE_MODES = ("squash", "crop")
REP_RECIPES = ("plain", "sqrt", "balanced", "inverse_weights")
SAMPLERS = ("none", "balanced", "sqrt", "progressive")
PACINGS = ("linear", "root", "step")
DIFFICULTY_SCORES = ("loss", "margin")


@dataclass(frozen=True)
class TrainingConfig:
    # ---- data -------------------------------------------------------------------------------------------
    data_root: str = ""               # "" -> the cached synthetic MVFouls data set (generated on first use)
    cache_dir: str = ""               # "" -> $MVFOULS_AB_CACHE, else ~/.cache/mvfouls_ab (data.dataset.default_cache_dir)
    frame_start: int = 71             # first frame of the window (the VARS baseline: 63); the foul is near 75
    frame_end: int = 79               # last frame of the window, inclusive (the VARS baseline: 87)
    fps: int = 17                     # nominal sampling rate inside the window (the VARS baseline: 17 -> 16 frames)
    num_frames: int = 3               # frames returned per clip, spread evenly over the window (baseline: 16)
    frame_size: int = 0               # frame height; 0 (with frame_width 0): the clips' native size, at most 224
                                      # rows (398x224 for the real release, 720p included; 256x144 synthetic)
    frame_width: int = 0              # frame width; 0 with frame_size > 0: a square frame_size x frame_size
    resize: str = "crop"              # crop: keep the aspect ratio, cover, centre-crop | squash: stretch to the size
    train_views: int = 2              # views sampled per action in training (all views at evaluation)
    num_workers: int = 0              # DataLoader workers
    pin_memory: bool = False

    # ---- model ------------------------------------------------------------------------------------------
    variant: str = "simplified"       # baseline (control arm) | simplified (A) | progressive (B) | optimized (C)
    complexity_level: int = 2         # progressive variant: 1 basic shared, 2 + attention, 3 + task-specific
    progressive_grow: bool = False    # progressive variant: level = phase number (1, 2, 3) as phases advance
    backbone: str = "frame2d"         # frame2d: small 2D CNN per frame (CPU) | small3d | torchvision video nets
    weights: str = "none"             # "none" | "DEFAULT" (torchvision, needs network) | path to a local file
    feature_mode: str = "learned"     # learned: the representation stage trains the backbone on Train, then its
                                      # per-view embeddings are cached | frozen: embeddings of `weights` as they
                                      # are | end_to_end: clips through the backbone in every step

    # ---- representation stage (feature_mode=learned; training/representation.py) ----------------------
    rep_recipe: str = "balanced"      # plain | sqrt | balanced (class-balanced sampling) | inverse_weights
    rep_epochs: int = 12
    rep_lr: float = 1e-3              # AdamW, cosine to 0 over the stage
    rep_batch_size: int = 16          # actions per step (each with all its views, at the window's middle frame)
    rep_width: int = 16               # frame2d channels of the first block (doubling per block; D = 4 x width)
    rep_weight_decay: float = 1e-4
    rep_seed: int = 0                 # the stage's seed (-1: the run seed); one stage serves every run seed
    rep_holdout: float = 0.15         # share of Train held out (stratified) for the stage's early stopping
    feature_precision: str = "auto"   # frozen torchvision features: auto (bf16 where the CPU has it) | fp32 | bf16
    hidden_dim: int = 256
    attention_heads: int = 8          # baseline uses 8; optimized forces 4
    dropout: float = 0.2

    # ---- phases -----------------------------------------------------------------------------------------
    num_phases: int = 3               # 1 = single-phase mode (A/B control recipes)
    phase1_epochs: int = 10
    phase2_epochs: int = 15
    phase3_epochs: int = 15
    phase1_lr: float = 1e-4
    phase2_lr: float = 5e-5
    phase3_lr: float = 2e-5
    max_weight_phase1: float = 1.5    # class-weight caps per phase (weights normalized to mean 1, then clipped)
    max_weight_phase2: float = 3.0
    max_weight_phase3: float = 5.0
    sampler_phase1: str = "balanced"  # phase 1 trains on a class-balanced subset; this samples within it
    sampler_phase2: str = "sqrt"
    sampler_phase3: str = "sqrt"
    backbone_lr_mult_phase1: float = 0.1
    backbone_lr_mult_phase2: float = 0.1
    backbone_lr_mult_phase3: float = 0.1
    aug_strength_phase1: float = 0.0  # minimal augmentation in phase 1, progressive afterwards
    aug_strength_phase2: float = 0.5
    aug_strength_phase3: float = 1.0
    oversample: str = ""              # extra sampling factors, e.g. "severity:3=8,action:7=4" (today's recipe)
    batch_size: int = 32
    grad_accum: int = 1
    weight_decay: float = 1e-3
    scheduler: str = "cosine"         # cosine | step | none (within each phase)
    step_size: int = 3                # StepLR (today's recipe)
    step_gamma: float = 0.1

    # ---- loss -------------------------------------------------------------------------------------------
    loss: str = "weighted_ce"
    focal_gamma: float = 2.0
    focal_alpha: float = -1.0         # < 0: no alpha term
    la_tau: float = 1.0               # logit-adjusted CE temperature
    ldam_max_margin: float = 0.5
    ldam_scale: float = 30.0
    drw_phase: int = 3                # LDAM deferred re-weighting starts in this phase
    label_smoothing: float = 0.0
    loss_weight_action: float = 1.0
    loss_weight_severity: float = 1.0
    posthoc_adjust: bool = True       # post-hoc logit adjustment, tau chosen on Valid
    posthoc_tau_max: float = 2.0      # grid 0..posthoc_tau_max in steps of 0.25

    # ---- curriculum -------------------------------------------------------------------------------------
    curriculum: bool = True           # used in phase 2 (and 3 if curriculum_phase3)
    curriculum_phase3: bool = False
    curriculum_score: str = "loss"    # difficulty from a scoring pass of the previous phase's model
    curriculum_start: float = 0.4     # fraction of the data in the first curriculum epoch
    curriculum_pacing: str = "linear" # linear | root | step
    curriculum_full_at: float = 0.6   # fraction of the phase's epochs after which all data is used

    # ---- phase 3 extras (off by default) ----------------------------------------------------------------
    pseudo_labels: bool = False
    pseudo_threshold: float = 0.9
    ensemble_top_k: int = 0           # > 1: average logits of the k best checkpoints for final predictions

    # ---- stability guard --------------------------------------------------------------------------------
    grad_clip: float = 5.0            # 0 = track only
    spike_factor: float = 2.0         # loss > spike_factor x previous epoch's -> LR x lr_backoff + rollback
    lr_backoff: float = 0.5
    collapse_patience: int = 3        # epochs at 0% recall before a class-collapse alert
    collapse_response: bool = False   # boost the collapsed class's weight (within the phase cap)
    max_recoveries: int = 3           # after this many rollbacks in a phase -> fall back to a simpler variant
    fallback_variant: str = "simplified"

    # ---- run --------------------------------------------------------------------------------------------
    seed: int = 0
    device: str = "auto"              # auto | cpu | cuda
    amp: bool = False                 # mixed precision on CUDA
    threads: int = 0                  # torch.set_num_threads; 0 = leave as is
    eval_every: int = 1

    # ----------------------------------------------------------------------------------------------------
    def __post_init__(self) -> None:
        # variant, fallback_variant, backbone and loss name registered things: registries.check_registered
        checks = {
            "feature_mode": FEATURE_MODES, "curriculum_pacing": PACINGS, "curriculum_score": DIFFICULTY_SCORES,
            "sampler_phase1": SAMPLERS, "sampler_phase2": SAMPLERS, "sampler_phase3": SAMPLERS,
            "scheduler": ("cosine", "step", "none"), "resize": RESIZE_MODES,
            "rep_recipe": REP_RECIPES, "feature_precision": ("auto", "fp32", "bf16"),
        }
        for name, allowed in checks.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name}={getattr(self, name)!r} is not one of {', '.join(allowed)}")
        if self.num_phases not in (1, 2, 3):
            raise ConfigError(f"num_phases={self.num_phases} must be 1, 2 or 3")
        if self.complexity_level not in (1, 2, 3):
            raise ConfigError(f"complexity_level={self.complexity_level} must be 1, 2 or 3")
        if not (self.frame_start <= self.frame_end):
            raise ConfigError(f"frame_start={self.frame_start} must be <= frame_end={self.frame_end}")
        if not 1 <= self.train_views <= 4:
            raise ConfigError(f"train_views={self.train_views} must be between 1 and 4")
        for name in ("batch_size", "grad_accum", "num_frames", "rep_epochs", "rep_batch_size", "rep_width"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be >= 1")
        if self.frame_width < 0 or self.frame_size < 0:
            raise ConfigError(f"frame_size={self.frame_size}, frame_width={self.frame_width} must be >= 0 "
                              "(frame_size 0: the clips' native size)")
        if not 0.0 <= self.rep_holdout < 0.5:
            raise ConfigError(f"rep_holdout={self.rep_holdout} must be in [0, 0.5)")
        if not 0.0 < self.curriculum_start <= 1.0:
            raise ConfigError(f"curriculum_start={self.curriculum_start} must be in (0, 1]")

    # ---- phase helpers ----------------------------------------------------------------------------------
    def phase_value(self, name: str, phase: int) -> Any:
        """phase_value('lr', 2) -> phase2_lr; 'max_weight', 'sampler', 'epochs', 'backbone_lr_mult', ..."""
        key = f"{name}_phase{phase}" if name in ("max_weight", "sampler", "backbone_lr_mult", "aug_strength") \
            else f"phase{phase}_{name}"
        return getattr(self, key)

    def replace(self, **changes: Any) -> TrainingConfig:
        return dataclasses.replace(self, **changes)

    def flat(self) -> dict[str, Any]:
        """Flat dict of every field (MLflow params, run folder config.json)."""
        return dataclasses.asdict(self)

    def to_yaml(self, path: Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.flat(), sort_keys=False))

    def fingerprint(self) -> str:
        return json.dumps(self.flat(), sort_keys=True)


FIELD_TYPES: dict[str, type] = {f.name: type(f.default) for f in fields(TrainingConfig)}


def coerce(name: str, value: Any, source: str = "config") -> Any:
    """Convert a YAML/CLI value to the field's type, with a clear error for unknown keys or bad values."""
    if name not in FIELD_TYPES:
        near = [k for k in FIELD_TYPES if name.split("_")[0] in k][:5]
        raise ConfigError(located(source, f"unknown TrainingConfig key {name!r}",
                                  f"use one of the documented keys{' (did you mean ' + ', '.join(near) + '?)' if near else ''}"))
    typ = FIELD_TYPES[name]
    try:
        if typ is bool and isinstance(value, str):
            if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(value)
            return value.lower() in ("true", "1", "yes")
        if typ is float and isinstance(value, (int, float, str)):
            return float(value)
        if typ is int and isinstance(value, str):
            return int(value)
        if typ is int and isinstance(value, float) and value.is_integer():
            return int(value)
        if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
            raise TypeError(value)
        return value
    except (TypeError, ValueError):
        raise ConfigError(located(source, f"{name}={value!r} is not a valid {typ.__name__}",
                                  f"give {name} a {typ.__name__} value")) from None


def load_config(path: str | Path | None = None, overrides: list[str] | dict[str, Any] | None = None,
                base: TrainingConfig | None = None) -> TrainingConfig:
    """Base defaults <- YAML file <- overrides ('key=value' strings or a dict)."""
    values: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(located(p, "config file not found", "pass an existing YAML file, e.g. experiments/recommended.yaml"))
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(located(p, f"not valid YAML ({exc})", "fix the YAML syntax")) from None
        if not isinstance(data, dict):
            raise ConfigError(located(p, "top level must be a mapping of TrainingConfig keys", "write key: value lines"))
        data.pop("description", None)
        values.update({k: coerce(k, v, str(p)) for k, v in data.items()})
    if isinstance(overrides, dict):
        values.update({k: coerce(k, v, "overrides") for k, v in overrides.items()})
    elif overrides:
        for item in overrides:
            if "=" not in item:
                raise ConfigError(located("--set", f"{item!r} is not key=value", "write --set key=value"))
            k, v = item.split("=", 1)
            values[k.strip()] = coerce(k.strip(), yaml.safe_load(v), "--set")
    return dataclasses.replace(base or TrainingConfig(), **values)


# Hardware profiles: overrides applied before a YAML file / --set. The CPU profile (= the defaults) learns its
# representation once: the representation stage trains a small per-frame 2D CNN on Train, its per-view embeddings
# are cached, and trials train only what sits above it (decoupled representation and classifier). The GPU
# profile fine-tunes a Kinetics-400 torchvision backbone end to end.
PROFILES: dict[str, dict[str, Any]] = {
    "cpu": {"backbone": "frame2d", "weights": "none", "feature_mode": "learned", "device": "cpu"},
    # Real data, no GPU: a frozen Kinetics-400 torchvision backbone (r2plus1d_18; --set backbone=s3d, or
    # backbone=mvit_v2_s frame_size=224) whose per-view embeddings are extracted once and cached (models/features.py);
    # weights "DEFAULT" (torchvision downloads them) or --set weights=/path/to/state_dict.pth. The frames keep their
    # aspect ratio: scaled to cover 112x112 and centre-cropped (not 398x224 squashed to a square).
    "pretrained": {"backbone": "r2plus1d_18", "weights": "DEFAULT", "feature_mode": "frozen", "device": "cpu",
                   "frame_start": 63, "frame_end": 87, "num_frames": 16, "frame_size": 112, "frame_width": 0,
                   "resize": "crop", "num_workers": 2},
    # Fine-tuning end to end: head LRs 5e-4 / 2e-4 / 1e-4, backbone at 0.1-0.2x of them (1e-5..5e-5); the study's
    # default search space for this profile is experiments/search_space_gpu.yaml.
    "gpu": {"backbone": "r2plus1d_18", "weights": "DEFAULT", "feature_mode": "end_to_end", "device": "cuda",
            "frame_start": 63, "frame_end": 87, "num_frames": 16, "frame_size": 112, "frame_width": 0,
            "resize": "crop", "batch_size": 8, "grad_accum": 4, "amp": True, "num_workers": 4,
            "pin_memory": True, "phase1_lr": 5e-4, "phase2_lr": 2e-4, "phase3_lr": 1e-4,
            "backbone_lr_mult_phase1": 0.1, "backbone_lr_mult_phase2": 0.2, "backbone_lr_mult_phase3": 0.2,
            "weight_decay": 1e-2},
}
