"""Backbones, view aggregation and the registered variants."""
from __future__ import annotations

import urllib.request

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch import nn
from torchvision.models import video as tv_video

from mvfouls_ab.config import TrainingConfig
from mvfouls_ab.errors import ConfigError
from mvfouls_ab.models.aggregation import AGGREGATIONS, build_aggregation
from mvfouls_ab.models.backbones import (
    TORCHVISION_BACKBONES,
    build_backbone,
    check_input_size,
    normalize_clips,
)
from mvfouls_ab.models.variants import (
    VARIANT_REGISTRY,
    build_model,
    count_parameters,
    register_variant,
    set_complexity,
)

VARIANTS = ("baseline", "simplified", "progressive", "optimized")
# Smallest legal input (T, H, W) of each torchvision backbone and its feature dim.
TORCHVISION = {"r3d_18": ((1, 16, 16), 512), "mc3_18": ((1, 16, 16), 512), "r2plus1d_18": ((1, 16, 16), 512),
               "s3d": ((8, 32, 32), 1024)}


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def tiny_cfg(**changes) -> TrainingConfig:
    return TrainingConfig(num_frames=4, frame_size=32, hidden_dim=32, **changes)


def padded_batch(d: int = 512) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """feats [3, 4, d], the same feats with other content in the padded views, and the mask."""
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(3, 4, d, generator=g)
    mask = torch.tensor([[True, True, False, False], [True, True, True, True], [True, False, False, False]])
    other = feats.clone()
    other[~mask] = 100 * torch.randn(int((~mask).sum()), d, generator=g)
    return feats, other, mask


# ---- backbones ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(TORCHVISION))
def test_torchvision_backbone_without_classifier(name: str) -> None:
    (t, h, w), dim = TORCHVISION[name]
    module, d = build_backbone(name, "none")
    assert d == dim
    attr = "fc" if name != "s3d" else "classifier"
    assert isinstance(getattr(module.net, attr), nn.Identity)
    assert not any(k.startswith(f"net.{attr}.") for k in module.state_dict())
    with torch.inference_mode():
        out = module.eval()(torch.randn(2, 3, t, h, w))
    assert out.shape == (2, dim)


def test_mvit_needs_16_frames_of_224() -> None:
    module, d = build_backbone("mvit_v2_s", "none")
    assert d == 768 and isinstance(module.net.head, nn.Identity)
    assert module.net.norm.normalized_shape == (768,)  # what enters the (removed) head
    with pytest.raises(ConfigError, match="16 frames of 224x224"):
        module(torch.zeros(1, 3, 16, 112, 112))
    with pytest.raises(ConfigError, match="num_frames=16 and frame_size=224"):
        build_backbone("mvit_v2_s", "none", num_frames=16, frame_size=112)
    with pytest.raises(ConfigError, match="16 frames of 224x224"):
        build_model(TrainingConfig(backbone="mvit_v2_s", frame_size=112))


def test_random_weights_are_seeded_and_leave_the_global_rng_alone() -> None:
    for name in ("small3d", "mc3_18"):
        torch.manual_seed(1)
        a, _ = build_backbone(name, "none")
        after_a = torch.rand(1)
        torch.manual_seed(2)
        b, _ = build_backbone(name, "none")
        for (key, x), y in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.equal(x, y), key
        torch.manual_seed(1)
        assert torch.equal(torch.rand(1), after_a)  # building consumed no global random numbers


def moving_squares(n: int, rng: np.random.Generator) -> tuple[torch.Tensor, dict[str, np.ndarray]]:
    """uint8 [n, 3, 16, 64, 64] noisy clips of a square; factors: direction, colour, height (each 0/1)."""
    f = {k: rng.integers(0, 2, n) for k in ("direction", "colour", "height")}
    clips = rng.integers(60, 100, (n, 3, 16, 64, 64)).astype(np.uint8)
    for i in range(n):
        y = 8 + 32 * f["height"][i] + rng.integers(0, 8)
        rgb = (220, 60, 60) if f["colour"][i] else (60, 60, 220)
        start = rng.integers(0, 8)
        for t in range(16):
            x = start + 3 * t if f["direction"][i] else 56 - start - 3 * t
            for c in range(3):
                clips[i, c, t, y:y + 10, max(x - 5, 0):x + 5] = rgb[c]
    return torch.from_numpy(clips), f


def test_small3d_frozen_features_carry_motion_colour_and_position() -> None:
    """A linear probe on the frozen, randomly initialised small3d embeddings decodes each factor of held-out clips."""
    module, d = build_backbone("small3d", "none")
    assert d == 512
    rng = np.random.default_rng(0)
    clips, factors = moving_squares(96, rng)
    with torch.inference_mode():
        feats = module.eval()(normalize_clips(clips)).numpy()
    for name, y in factors.items():
        probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)).fit(feats[:64], y[:64])
        assert probe.score(feats[64:], y[64:]) >= 0.9, name
    # Half of the stem's filters are motion filters (zero temporal mean).
    weight = module.stem.weight
    assert torch.allclose(weight[: weight.shape[0] // 2].sum(dim=2), torch.zeros(()), atol=1e-5)


def test_normalize_clips_uses_kinetics_stats() -> None:
    x = torch.tensor([0, 255], dtype=torch.uint8).view(1, 1, 1, 2).expand(3, 1, 1, 2)
    out = normalize_clips(x)
    assert out.dtype == torch.float32
    assert torch.allclose(out[0, 0, 0], torch.tensor([-0.43216 / 0.22803, (1 - 0.43216) / 0.22803]), atol=1e-5)


def test_local_weight_file_with_classifier(tmp_path) -> None:
    torch.manual_seed(7)
    full = tv_video.s3d(weights=None)  # a full network, classifier included
    path = tmp_path / "s3d.pth"
    torch.save({"epoch": 3, "state_dict": full.state_dict()}, path)  # a checkpoint wrapping the state dict
    module, d = build_backbone("s3d", str(path))
    assert d == 1024
    loaded = module.net.state_dict()
    expected = {k: v for k, v in full.state_dict().items() if not k.startswith("classifier.")}
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[k], v) for k, v in expected.items())
    # a plain state dict of the wrapper module loads too (e.g. a fine-tuned small3d)
    small, _ = build_backbone("small3d")
    small.stem.weight.data.add_(1.0)
    torch.save(small.state_dict(), tmp_path / "small.pth")
    again, _ = build_backbone("small3d", str(tmp_path / "small.pth"))
    assert torch.equal(again.stem.weight, small.stem.weight)
    # the backbone of a whole MVFoulsModel checkpoint (e.g. fine-tuned end to end)
    model = build_model(tiny_cfg(feature_mode="end_to_end", backbone="small3d"))
    model.backbone.conv3.weight.data.mul_(3.0)
    torch.save({"model": model.state_dict()}, tmp_path / "model.pth")
    again, _ = build_backbone("small3d", str(tmp_path / "model.pth"))
    assert torch.equal(again.conv3.weight, model.backbone.conv3.weight)


def test_weight_file_errors(tmp_path) -> None:
    small, _ = build_backbone("small3d")
    torch.save(small.state_dict(), tmp_path / "small.pth")
    with pytest.raises(ConfigError, match="do not match the backbone.*missing keys"):
        build_backbone("s3d", str(tmp_path / "small.pth"))
    with pytest.raises(ConfigError, match="weights file not found"):
        build_backbone("r3d_18", str(tmp_path / "nope.pth"))
    (tmp_path / "junk.pth").write_text("not a checkpoint")
    with pytest.raises(ConfigError, match="cannot read weights file"):
        build_backbone("small3d", str(tmp_path / "junk.pth"))


def test_default_weights_offline_say_to_pass_a_local_file(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # no cached download
    # urllib caches its first opener, proxies included: restore it afterwards so later tests reach loopback
    monkeypatch.setattr(urllib.request, "_opener", None)
    for var in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")  # nothing listens there: the download fails at once
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    with pytest.raises(ConfigError, match="local file"):
        build_backbone("mc3_18", "DEFAULT")


# ---- weights files for every torchvision backbone ----------------------------------------------------------------
# Clip size (T, H, W) each backbone is checked with: the smallest legal one (mvit_v2_s only takes 16 x 224 x 224).
CHECK_INPUT = {**{name: shape for name, (shape, _) in TORCHVISION.items()}, "mvit_v2_s": (16, 224, 224)}


def random_torchvision(name: str, seed: int = 11) -> nn.Module:
    """A full torchvision network (classifier included), randomly initialised with another seed than ours."""
    torch.manual_seed(seed)
    return getattr(tv_video, name)(weights=None)


def reference_features(full: nn.Module, name: str, clips: torch.Tensor) -> torch.Tensor:
    """What the file's network gives without its classifier, for uint8 clips normalized the way torchvision's own
    DEFAULT weights transform says (mean/std of `weights.transforms()`, no download)."""
    from torchvision.models import get_model_weights

    transform = get_model_weights(name).DEFAULT.transforms()
    mean = torch.tensor(transform.mean).view(3, 1, 1, 1)
    std = torch.tensor(transform.std).view(3, 1, 1, 1)
    attr = TORCHVISION_BACKBONES[name][1]
    setattr(full, attr, nn.Identity())
    if name == "s3d":
        full.avgpool = nn.AdaptiveAvgPool3d(1)
    with torch.inference_mode():
        return full.eval()((clips.float() / 255 - mean) / std).flatten(1)


@pytest.fixture(scope="module")
def other_weights(tmp_path_factory) -> dict[str, str]:
    """State dicts of two other architectures (to load into the wrong backbone)."""
    root = tmp_path_factory.mktemp("other_weights")
    files = {}
    for name in ("s3d", "mc3_18"):
        files[name] = str(root / f"{name}.pth")
        torch.save(random_torchvision(name, seed=3).state_dict(), files[name])
    return files


@pytest.mark.parametrize("name", list(TORCHVISION_BACKBONES))
def test_weights_file_loads_into_each_torchvision_backbone(name: str, tmp_path, other_weights) -> None:
    full = random_torchvision(name)
    path = tmp_path / f"{name}.pth"
    torch.save(full.state_dict(), path)            # what torch.save(model.state_dict()) of a torchvision net holds
    random, _ = build_backbone(name, "none")
    loaded, dim = build_backbone(name, str(path))
    attr = TORCHVISION_BACKBONES[name][1]
    expected = {k: v for k, v in full.state_dict().items() if not k.startswith(f"{attr}.")}
    state = loaded.net.state_dict()
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[k], v) for k, v in expected.items())
    assert not all(torch.equal(state[k], v) for k, v in random.net.state_dict().items())
    g = torch.Generator().manual_seed(0)
    if name == "mvit_v2_s":   # a full forward takes ~5 s on one thread (test_mvit_weights_file_forward): the stem
        x = normalize_clips(torch.randint(0, 256, (1, 3, *CHECK_INPUT[name]), generator=g, dtype=torch.uint8))
        with torch.inference_mode():
            a, b = loaded.net.conv_proj(x), random.net.conv_proj(x)
        assert not torch.allclose(a, b, atol=1e-3)
    else:
        clips = torch.randint(0, 256, (2, 3, *CHECK_INPUT[name]), generator=g, dtype=torch.uint8)
        with torch.inference_mode():
            out, before = loaded.eval()(normalize_clips(clips)), random.eval()(normalize_clips(clips))
        assert out.shape == (2, dim)
        scale = float(out.abs().max())                             # s3d's random-init features are ~1e-6
        assert float((out - before).abs().max()) > 0.1 * scale     # the file's weights changed the output
        assert float((out - reference_features(full, name, clips)).abs().max()) <= 1e-4 * scale
    # the wrong architecture's file, and a truncated copy of the right one: one clear ConfigError each
    wrong = other_weights["mc3_18" if name == "s3d" else "s3d"]
    with pytest.raises(ConfigError, match=rf"{wrong}.*do not match the backbone.*same architecture"):
        build_backbone(name, wrong)
    if name == "r3d_18":   # same key names, other kernel shapes
        with pytest.raises(ConfigError, match="shape mismatches"):
            build_backbone(name, other_weights["mc3_18"])
    cut = tmp_path / "cut.pth"
    with open(path, "rb") as whole:
        cut.write_bytes(whole.read(1 << 20))                       # an interrupted download
    with pytest.raises(ConfigError, match="cut.pth.*cannot read weights file"):
        build_backbone(name, str(cut))


@pytest.mark.slow
def test_mvit_weights_file_forward(tmp_path) -> None:
    """mvit_v2_s from a weights file gives the file's network's features, with mvit's own normalization
    (mean 0.45, std 0.225, not the other backbones' Kinetics statistics) applied to normalize_clips' output."""
    full = random_torchvision("mvit_v2_s")
    torch.save(full.state_dict(), tmp_path / "mvit.pth")
    loaded, dim = build_backbone("mvit_v2_s", str(tmp_path / "mvit.pth"))
    clips = torch.randint(0, 256, (1, 3, 16, 224, 224), generator=torch.Generator().manual_seed(0),
                          dtype=torch.uint8)
    with torch.inference_mode():
        out = loaded.eval()(normalize_clips(clips))
    assert out.shape == (1, dim) == (1, 768)
    scale = float(out.abs().max())
    assert float((out - reference_features(full, "mvit_v2_s", clips)).abs().max()) <= 1e-4 * scale


def test_torchvision_input_checks_use_height_and_width() -> None:
    with pytest.raises(ConfigError, match="frame_width=0 or 224"):
        build_backbone("mvit_v2_s", "none", num_frames=16, frame_size=224, frame_width=200)
    check_input_size("mvit_v2_s", 16, 224, 0)     # 0: square
    check_input_size("mvit_v2_s", 16, 224, 224)
    module, d = build_backbone("r2plus1d_18", "none", num_frames=4, frame_size=32, frame_width=56)
    with torch.inference_mode():
        assert module.eval()(torch.randn(1, 3, 4, 32, 56)).shape == (1, d)   # any aspect ratio


# ---- aggregation -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", AGGREGATIONS)
def test_aggregation_ignores_padded_views(kind: str) -> None:
    torch.manual_seed(0)
    agg = build_aggregation(kind, 16, heads=4).eval()
    feats, other, mask = padded_batch(16)
    out = agg(feats, mask)
    assert out.shape == (3, 16)
    assert torch.allclose(out, agg(other, mask), atol=1e-5)
    # a single real view: max and mean return it unchanged
    if kind in ("max", "mean"):
        assert torch.allclose(out[2], feats[2, 0])


# ---- variants ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", VARIANTS)
def test_variant_shapes_masks_and_gradients(variant: str) -> None:
    torch.manual_seed(0)
    model = build_model(tiny_cfg(variant=variant, complexity_level=3))
    assert model.variant == variant
    feats, other, mask = padded_batch(model.feature_dim)
    model.eval()
    out = model.forward_features(feats, mask)
    assert out["action"].shape == (3, 8) and out["severity"].shape == (3, 4)
    again = model.forward_features(other, mask)
    for task in out:
        assert torch.allclose(out[task], again[task], atol=1e-5), task
    # end to end from uint8 clips: the padded clips' content does not matter either
    clips = torch.randint(0, 255, (3, 4, 3, 4, 32, 32), dtype=torch.uint8)
    changed = clips.clone()
    changed[~mask] = 255 - changed[~mask]
    a, b = model(clips, mask), model(changed, mask)
    for task in a:
        assert a[task].shape == out[task].shape
        assert torch.allclose(a[task], b[task], atol=1e-5), task
    # every head parameter learns (the zero-initialised residual blocks included)
    model.train()
    loss = sum(o.square().mean() for o in model.forward_features(feats, mask).values())
    loss.backward()
    assert all(p.grad is not None for p in model.head.parameters())


def test_attention_heads_per_variant() -> None:
    base = build_model(tiny_cfg(variant="baseline"))
    assert base.head.attn_action is not base.head.attn_severity  # separate attention per task
    assert base.head.attn_action.attention.attn.num_heads == 8
    opt = build_model(tiny_cfg(variant="optimized"))
    assert opt.head.attn_action.attention.attn.num_heads == 4
    assert any(isinstance(m, nn.Dropout) and m.p >= 0.3 for m in opt.head.modules())
    simple = build_model(tiny_cfg(variant="simplified"))
    attentions = [m for m in simple.head.modules() if isinstance(m, nn.MultiheadAttention)]
    assert len(attentions) == 1 and attentions[0].num_heads == 8


def test_frozen_and_end_to_end_parameter_counts() -> None:
    frozen = build_model(tiny_cfg(variant="baseline", feature_mode="frozen"))
    counts = count_parameters(frozen)
    assert counts["total"] == counts["backbone"] + counts["head"]
    assert counts["trainable"] == counts["head"] > 0 and counts["backbone"] > 0
    frozen.train()
    assert not frozen.backbone.training and frozen.head.training
    e2e = build_model(tiny_cfg(variant="baseline", feature_mode="end_to_end"))
    e2e.train()
    assert e2e.backbone.training
    assert count_parameters(e2e)["trainable"] == counts["total"]
    sizes = {v: count_parameters(build_model(tiny_cfg(variant=v)))["head"] for v in VARIANTS}
    assert sizes["simplified"] < sizes["baseline"]  # one shared attention instead of two


def test_progressive_growth_keeps_weights_and_predictions() -> None:
    torch.manual_seed(0)
    model = build_model(tiny_cfg(variant="progressive", complexity_level=1))
    assert model.head.level == 1 and model.head.attn is None
    feats, _, mask = padded_batch(model.feature_dim)
    opt = torch.optim.SGD(model.head.parameters(), lr=0.1)  # "train" a step so weights are not the init
    sum(o.mean() for o in model.forward_features(feats, mask).values()).backward()
    opt.step()
    counts = [count_parameters(model)["head"]]
    for level in (2, 3):
        model.eval()
        before_state = {k: v.clone() for k, v in model.head.state_dict().items()}
        before = model.forward_features(feats, mask)
        set_complexity(model, level)
        assert model.head.level == level
        state = model.head.state_dict()
        assert set(before_state) < set(state)
        assert all(torch.equal(state[k], v) for k, v in before_state.items())
        after = model.forward_features(feats, mask)
        for task in before:
            assert torch.allclose(before[task], after[task], atol=1e-6)
        counts.append(count_parameters(model)["head"])
    assert counts[0] < counts[1] < counts[2]
    assert model.head.attn is not None and model.head.task_action is not None
    set_complexity(model, 1)  # a lower level drops the blocks above it
    assert model.head.attn is None and count_parameters(model)["head"] == counts[0]
    with pytest.raises(ConfigError, match="1, 2 or 3"):
        set_complexity(model, 4)
    with pytest.raises(ConfigError, match="progressive"):
        set_complexity(build_model(tiny_cfg(variant="simplified")), 2)
    assert build_model(tiny_cfg(variant="progressive", complexity_level=2)).head.level == 2


def test_registry() -> None:
    assert set(VARIANTS) <= set(VARIANT_REGISTRY)
    with pytest.raises(ValueError, match="already registered"):
        register_variant("baseline")(lambda cfg, dim: nn.Identity())
