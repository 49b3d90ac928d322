"""Hardware profiles: every CLI offers config.PROFILES; `pretrained` (frozen Kinetics-400 features on CPU) and `gpu`
(end-to-end fine-tuning, its own search space) run end to end on tiny data with weights files the tests write."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mvfouls_ab.cli import ab, train
from mvfouls_ab.cli import study as study_cli
from mvfouls_ab.config import PROFILES, TrainingConfig
from mvfouls_ab.data.annotations import load_split
from mvfouls_ab.data.dataset import load_data
from mvfouls_ab.evaluation.official import official_metrics
from mvfouls_ab.orchestration import search_space, study

REPO = Path(__file__).resolve().parents[2]
# Few, small frames and one epoch per phase: the profile's path, not its cost.
TINY = {"num_frames": 4, "frame_size": 32, "phase1_epochs": 1, "phase2_epochs": 1, "phase3_epochs": 1,
        "batch_size": 4, "num_workers": 0, "threads": 1}


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def test_every_cli_offers_every_profile() -> None:
    assert {"cpu", "gpu", "pretrained"} <= set(PROFILES)
    for name in PROFILES:
        assert train.parse_args(["--profile", name]).profile == name
        assert ab.build_parser().parse_args(["--experiment", "x.yaml", "--profile", name]).profile == name
        assert study_cli.parse_args(["--profile", name]).profile == name
        TrainingConfig().replace(**PROFILES[name])   # a valid config


def test_pretrained_and_gpu_profiles_keep_the_aspect_ratio() -> None:
    pre = TrainingConfig().replace(**PROFILES["pretrained"])
    assert (pre.backbone, pre.weights, pre.feature_mode, pre.device) == ("r2plus1d_18", "DEFAULT", "frozen", "cpu")
    gpu = TrainingConfig().replace(**PROFILES["gpu"])
    assert (gpu.feature_mode, gpu.device) == ("end_to_end", "cuda")
    for cfg in (pre, gpu):
        assert (cfg.resize, cfg.frame_size, cfg.frame_width, cfg.num_frames) == ("crop", 112, 0, 16)
        # the VARS window: frames 63..87, 16 frames
        assert (cfg.frame_start, cfg.frame_end) == (63, 87)
        # mvit_v2_s needs only its own size: frame_width 0 follows frame_size
        cfg.replace(backbone="mvit_v2_s", frame_size=224)
    # fine-tuning rates: heads 1e-4..1e-3, the backbone 1e-5..1e-4
    for phase in (1, 2, 3):
        lr = gpu.phase_value("lr", phase)
        assert 1e-4 <= lr <= 1e-3
        assert 1e-5 <= lr * gpu.phase_value("backbone_lr_mult", phase) <= 1e-4


def test_gpu_profile_studies_its_own_search_space(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    gpu_file = REPO / "experiments" / "search_space_gpu.yaml"
    assert search_space.default_file("gpu") == gpu_file
    gpu_space = search_space.load_search_space(gpu_file)
    assert gpu_space["fixed"]["feature_mode"] == "end_to_end"
    params = gpu_space["params"]
    for phase in (1, 2, 3):                              # head LRs of fine-tuning, not the CPU heads' 1e-2
        assert 1e-5 <= params[f"phase{phase}_lr"]["low"] and params[f"phase{phase}_lr"]["high"] <= 1e-3
        assert f"backbone_lr_mult_phase{phase}" in params
    assert {"batch_size", "grad_accum"} <= set(params)
    cpu_lr_high = search_space.load_search_space(None)["params"]["phase1_lr"]["high"]
    assert params["phase1_lr"]["high"] < cpu_lr_high

    def joined(*argv: str) -> dict:
        args = study_cli.parse_args(["--storage", f"sqlite:///{tmp_path / 'optuna.db'}", "--study-name",
                                 f"s{len(argv)}", *argv])
        return study.join_study(args)[0]

    assert joined("--profile", "gpu") == gpu_space
    assert joined("--profile", "cpu") == search_space.load_search_space(None)
    own = REPO / "experiments" / "search_space.yaml"
    assert joined("--profile", "gpu", "--search-space", str(own)) == search_space.load_search_space(own)  # still overrides


def run_profile(profile: str, data: Path, tmp_path: Path, **changes) -> tuple[TrainingConfig, object]:
    from mvfouls_ab.training.trainer import Trainer

    cfg = TrainingConfig().replace(**PROFILES[profile]).replace(
        data_root=str(data), cache_dir=str(tmp_path / "cache"), **TINY, **changes)
    bundle = load_data(cfg)
    return cfg, Trainer(cfg, bundle, [], tmp_path / "run").run()


def check_run(result, data: Path) -> None:
    assert len(result.history) == 3
    for split in ("valid", "test"):
        saved = official_metrics(data / split.capitalize() / "annotations.json", result.predictions[split])
        assert saved == result.official[split]
        preds = json.loads(Path(result.predictions[split]).read_text())["Actions"]
        assert set(preds) == {a.action_id for a in load_split(data, split.capitalize()).actions}


@pytest.mark.slow
def test_pretrained_profile_end_to_end(tiny_mvfouls: Path, tmp_path: Path, r2plus1d_weights: Path) -> None:
    """--profile pretrained with a local weights file: features extracted once (frozen r2plus1d_18, centre crop),
    cached, then the three phases train the head only."""
    _, result = run_profile("pretrained", tiny_mvfouls, tmp_path, weights=str(r2plus1d_weights))
    check_run(result, tiny_mvfouls)
    assert result.parameters["trainable"] == result.parameters["head"] < result.parameters["backbone"]
    features = sorted((tmp_path / "cache" / "features").glob("r2plus1d_18-*/*.npz"))
    assert {p.stem for p in features} >= {"Train", "Valid", "Test"}
    meta = json.loads((features[0].parent / "meta.json").read_text())
    assert meta["resize"] == "crop" and meta["weights"].startswith("sha1:")


@pytest.mark.slow
def test_gpu_profile_fine_tunes_end_to_end_on_cpu(tiny_mvfouls: Path, tmp_path: Path, r2plus1d_weights: Path) -> None:
    """--profile gpu's path (end to end, backbone at its LR multiplier) on CPU with a local weights file."""
    _, result = run_profile("gpu", tiny_mvfouls, tmp_path, weights=str(r2plus1d_weights), device="cpu", amp=False,
                              pin_memory=False, grad_accum=1)
    check_run(result, tiny_mvfouls)
    assert result.parameters["trainable"] == result.parameters["backbone"] + result.parameters["head"]
    state = torch.load(result.checkpoint, map_location="cpu", weights_only=False)
    model = state.get("model", state)
    before = torch.load(r2plus1d_weights, weights_only=True)
    changed = [k for k, v in before.items() if f"backbone.net.{k}" in model and v.is_floating_point()
               and not torch.equal(model[f"backbone.net.{k}"].float(), v)]
    assert changed, "the backbone did not train"
