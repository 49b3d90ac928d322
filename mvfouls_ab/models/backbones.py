"""Video backbones as feature extractors: float clips [N, C, T, H, W] -> embeddings [N, D].

`build_backbone(name, weights)` returns `(module, D)`. Names:
  small3d                         seeded, deterministic small 3D CNN for CPU (weights "none" or a local file)
  r3d_18, mc3_18, r2plus1d_18, s3d, mvit_v2_s   torchvision video networks with their classifier removed
Weights: "none" (random init), "DEFAULT" (torchvision's Kinetics-400 weights, needs network), or the path of a
local state-dict / checkpoint file. Clips are normalized with the Kinetics-400 mean/std by `normalize_clips`
(mvit_v2_s's weights expect mean 0.45 / std 0.225: its wrapper maps one to the other, `TORCHVISION_NORM`).
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..config import TrainingConfig
from ..errors import ConfigError, located

# Kinetics-400 normalization used by every torchvision video model.
KINETICS_MEAN = (0.43216, 0.394666, 0.37645)
KINETICS_STD = (0.22803, 0.22145, 0.216989)

# Random ("none") weights are drawn from this fixed seed, independent of the run seed and without touching the
# global RNG: a frozen random backbone is the same network in every run, so cached features are shared by all runs.
BACKBONE_SEED = 1234
BACKBONE_VERSION = "3"  # bump when a backbone's architecture or init changes (part of the feature-cache key)


def normalize_clips(clips: torch.Tensor) -> torch.Tensor:
    """uint8 [..., C, T, H, W] (0..255) -> float32 normalized with the Kinetics-400 mean/std."""
    peak = 255.0 if clips.dtype == torch.uint8 else 1.0
    shape = [1] * clips.dim()
    shape[-4] = 3
    std = torch.tensor(KINETICS_STD, device=clips.device).view(shape)
    mean = torch.tensor(KINETICS_MEAN, device=clips.device).view(shape)
    x = clips.to(torch.float32, copy=True)
    return x.mul_(1.0 / (peak * std)).sub_(mean / std)


class Small3D(nn.Module):
    """A small 3D CNN for CPU that keeps a coarse spatio-temporal layout in its embedding.

    A strided conv3d stack reduces [3, 16, 112, 112] to [64, 4, 7, 7], and adaptive average pooling to a (2, 2, 2)
    grid keeps where and when things happen: D = 64 * 2 * 2 * 2 = 512. Half of the stem's filters are initialised
    to sum to zero over time, so they respond to change between frames only (motion) while the other half see
    appearance (colour). With this fixed-seed random init and no normalization layers it is a usable frozen feature
    extractor (motion, position and colour survive), and it can also be trained end to end.
    """

    def __init__(self, width: int = 16, grid: tuple[int, int, int] = (2, 2, 2), seed: int = BACKBONE_SEED) -> None:
        super().__init__()
        self.grid = grid
        self.stem = nn.Conv3d(3, width, kernel_size=(3, 4, 4), stride=(2, 4, 4), padding=(1, 0, 0))
        self.conv2 = nn.Conv3d(width, 2 * width, kernel_size=3, stride=2, padding=1)
        self.conv3 = nn.Conv3d(2 * width, 4 * width, kernel_size=3, stride=(1, 2, 2), padding=1)
        self.out_dim = 4 * width * grid[0] * grid[1] * grid[2]
        gen = torch.Generator().manual_seed(seed)
        for conv in (self.stem, self.conv2, self.conv3):
            nn.init.kaiming_normal_(conv.weight, nonlinearity="relu", generator=gen)
            nn.init.zeros_(conv.bias)
        with torch.no_grad():  # motion filters: zero temporal mean (a random temporal-difference filter)
            motion = self.stem.weight[: width // 2]
            motion.sub_(motion.mean(dim=2, keepdim=True)).mul_(1.5 ** 0.5)  # keep the variance

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        x = F.relu(self.conv2(x))
        x = F.relu(self.conv3(x))
        return F.adaptive_avg_pool3d(x, self.grid).flatten(1)


# name -> (torchvision builder name, classifier attribute, feature dim entering the classifier)
TORCHVISION_BACKBONES: dict[str, tuple[str, str, int]] = {
    "r3d_18": ("r3d_18", "fc", 512),
    "mc3_18": ("mc3_18", "fc", 512),
    "r2plus1d_18": ("r2plus1d_18", "fc", 512),
    "s3d": ("s3d", "classifier", 1024),
    "mvit_v2_s": ("mvit_v2_s", "head", 768),
}
MVIT_INPUT = (16, 224, 224)  # mvit_v2_s's positional embeddings are fixed to 16 frames of 224x224
# Backbones whose torchvision weights were trained with another normalization than KINETICS_MEAN/STD (their
# `weights.transforms()`): TorchvisionBackbone maps normalize_clips' output to it, so every caller normalizes alike.
TORCHVISION_NORM: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "mvit_v2_s": ((0.45, 0.45, 0.45), (0.225, 0.225, 0.225)),
}
BACKBONE_NAMES = ("frame2d", "small3d", *TORCHVISION_BACKBONES)


class TorchvisionBackbone(nn.Module):
    """A torchvision video network whose classifier was replaced by Identity."""

    def __init__(self, name: str, net: nn.Module, out_dim: int) -> None:
        super().__init__()
        self.name = name
        self.net = net
        self.out_dim = out_dim
        # x_kinetics * scale + shift = the input normalized as this backbone's weights expect (None: as is)
        self.renorm: tuple[tuple[float, ...], tuple[float, ...]] | None = None
        if name in TORCHVISION_NORM:
            mean, std = TORCHVISION_NORM[name]
            self.renorm = (tuple(ks / s for ks, s in zip(KINETICS_STD, std)),
                           tuple((km - m) / s for km, m, s in zip(KINETICS_MEAN, mean, std)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.name == "mvit_v2_s":
            check_input_size(self.name, x.shape[-3], x.shape[-2], x.shape[-1])
        if self.renorm is not None:
            scale, shift = (torch.tensor(v, dtype=x.dtype, device=x.device).view(3, 1, 1, 1) for v in self.renorm)
            x = x * scale + shift
        return self.net(x).flatten(1)


def default_weights(name: str) -> tuple[str, str]:
    """torchvision's DEFAULT weights of a torchvision backbone, without downloading them: (enum name, e.g.
    'R2Plus1D_18_Weights.KINETICS400_V1', download URL)."""
    from torchvision.models import get_model_weights

    weights = get_model_weights(TORCHVISION_BACKBONES[name][0]).DEFAULT
    return str(weights), weights.url


def check_input_size(name: str, num_frames: int, height: int, width: int = 0) -> None:
    """mvit_v2_s only accepts 16 frames of 224x224 (width 0 = height, a square frame); every other backbone takes
    any clip size."""
    width = width or height
    if name == "mvit_v2_s" and (num_frames, height, width) != MVIT_INPUT:
        raise ConfigError(located(f"backbone={name}", f"needs clips of 16 frames of 224x224, got {num_frames} "
                                  f"frames of {width}x{height}",
                                  "set num_frames=16 and frame_size=224 (and frame_width=0 or 224)"))


def _check_loadable(path: Path) -> None:
    if not path.is_file():
        raise ConfigError(located(path, "weights file not found",
                                  "pass weights=none, weights=DEFAULT (needs network) or an existing state-dict file"))


def _load_state(module: nn.Module, path: Path, classifier_prefixes: tuple[str, ...]) -> None:
    """Load a local state dict (or a checkpoint holding one), dropping classifier keys; clear error on mismatch."""
    _check_loadable(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is a user error here
        raise ConfigError(located(path, f"cannot read weights file ({exc.__class__.__name__}: {exc})",
                                  "pass a file written by torch.save(model.state_dict(), path)")) from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict):
        raise ConfigError(located(path, "does not hold a state dict", "save model.state_dict()"))
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if any(k.startswith("backbone.") for k in state):  # a whole MVFoulsModel (e.g. fine-tuned end to end)
        state = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
    expected = module.state_dict()
    # Accept keys with or without the wrapper prefix ("net." for torchvision backbones).
    prefix = "net." if any(k.startswith("net.") for k in expected) else ""
    if prefix and not any(k.startswith(prefix) for k in state):
        state = {prefix + k: v for k, v in state.items()}
    state = {k: v for k, v in state.items()
             if not any(k.startswith(prefix + p) for p in classifier_prefixes)}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(state) & set(expected) if tuple(state[k].shape) != tuple(expected[k].shape))
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:3])})")
        if wrong:
            parts.append(f"{len(wrong)} shape mismatches (e.g. {wrong[0]}: file {tuple(state[wrong[0]].shape)} vs "
                         f"model {tuple(expected[wrong[0]].shape)})")
        raise ConfigError(located(path, "weights do not match the backbone: " + "; ".join(parts),
                                  "pass a state dict saved from the same architecture as cfg.backbone"))
    module.load_state_dict(state)


def build_backbone(name: str, weights: str = "none", num_frames: int | None = None,
                   frame_size: int | None = None, frame_width: int = 0, *,
                   cnn_width: int = 16, seed: int = BACKBONE_SEED) -> tuple[nn.Module, int]:
    """Build a feature extractor mapping normalized float [N, 3, T, H, W] -> [N, D]; returns (module, D).

    Give num_frames/frame_size (the height; frame_width, 0 = square) to check the clip size up front (mvit_v2_s
    needs 16 x 224 x 224).
    """
    if name not in BACKBONE_NAMES:
        raise ConfigError(located(f"backbone={name}", "unknown backbone", f"use one of {', '.join(BACKBONE_NAMES)}"))
    if num_frames is not None and frame_size is not None:
        check_input_size(name, num_frames, frame_size, frame_width)
    weights = weights or "none"
    if name == "frame2d":   # cnn_width: channels of its first block (cfg.rep_width); seed: its random init
        from .frame2d import Frame2D

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            module = Frame2D(cnn_width)
        if weights == "DEFAULT":
            raise ConfigError(located("backbone=frame2d", "has no pretrained DEFAULT weights",
                                      "use feature_mode=learned (the representation stage trains it), weights=none "
                                      "or a local state-dict file"))
        if weights != "none":
            _load_state(module, Path(weights), ())
        return module, module.out_dim
    if name == "small3d":
        with torch.random.fork_rng(devices=[]):  # the layers' default init draws from the global RNG
            module: nn.Module = Small3D()
        if weights == "DEFAULT":
            raise ConfigError(located("backbone=small3d", "has no pretrained DEFAULT weights",
                                      "use weights=none or a local state-dict file"))
        if weights != "none":
            _load_state(module, Path(weights), ())
        return module, module.out_dim

    from torchvision.models import video as tv_video

    builder_name, attr, dim = TORCHVISION_BACKBONES[name]
    builder = getattr(tv_video, builder_name)
    if weights == "DEFAULT":
        try:
            net = builder(weights="DEFAULT")
        except Exception as exc:  # noqa: BLE001 - offline download failures come in many types
            url = default_weights(name)[1]
            raise ConfigError(located(f"backbone={name}", f"could not download torchvision's DEFAULT weights "
                                      f"({exc.__class__.__name__}: {exc})",
                                      f"download {url} where there is network and pass weights=/path/to/that/file "
                                      f"(a local file), or put it in $TORCH_HOME/hub/checkpoints/, or use "
                                      f"weights=none")) from None
    elif weights == "none":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(BACKBONE_SEED)
            net = builder(weights=None)
    else:  # a local file holds every tensor: skip the random init (~0.5 s for 30M parameters), allocate, load
        with torch.device("meta"):
            net = builder(weights=None)
    setattr(net, attr, nn.Identity())  # s3d: classifier -> Identity, its forward then averages over (T, H, W)
    if name == "s3d":
        net.avgpool = nn.AdaptiveAvgPool3d(1)  # global average: any clip size (the fixed (2, 7, 7) needs 224px)
    module = TorchvisionBackbone(name, net, dim)
    if weights not in ("none", "DEFAULT"):
        _check_loadable(Path(weights))
        module.to_empty(device="cpu")   # every parameter and buffer is in the state dict: load_state_dict fills them
        _load_state(module, Path(weights), (attr + ".",))
    return module, dim


def backbone_from_config(cfg: TrainingConfig, weights: str | None = None) -> tuple[nn.Module, int]:
    """build_backbone with every setting read from a TrainingConfig (`weights` overrides cfg.weights)."""
    return build_backbone(cfg.backbone, cfg.weights if weights is None else weights, cfg.num_frames, cfg.frame_size,
                          cfg.frame_width, cnn_width=cfg.rep_width)
