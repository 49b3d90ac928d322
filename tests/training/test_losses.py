import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import balanced_accuracy_score

from mvfouls_ab.config import TrainingConfig
from mvfouls_ab.training import losses as L
from mvfouls_ab.training.rebalance import class_weights

COUNTS = np.array([304, 1303, 685, 27])


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    return torch.randn(16, 4, generator=g), torch.randint(0, 4, (16,), generator=g)


def test_the_loss_registry_is_the_only_list():
    from mvfouls_ab.errors import ConfigError
    from mvfouls_ab.training.registry import check_registered, registered

    assert registered()["loss"] == tuple(L.LOSSES)
    for name in L.LOSSES:
        check_registered(TrainingConfig(loss=name))
    with pytest.raises(ConfigError, match="loss='nope' is not one of"):
        check_registered(TrainingConfig(loss="nope"))


def test_ce_and_weighted_ce(batch):
    z, y = batch
    cfg = TrainingConfig(loss="ce")
    assert L.build_loss(cfg, "severity", COUNTS, torch.tensor([1.0, 0.1, 4.0, 9.0]), 1)(z, y).item() == pytest.approx(
        F.cross_entropy(z, y).item())   # plain CE ignores class weights
    cfg = TrainingConfig(loss="weighted_ce")
    w = torch.as_tensor(class_weights(COUNTS, 3.0), dtype=torch.float32)
    expected = F.cross_entropy(z, y, weight=w).item()
    assert L.build_loss(cfg, "severity", COUNTS, None, 2)(z, y).item() == pytest.approx(expected)   # cap of phase 2
    assert L.build_loss(cfg, "severity", COUNTS, w, 1)(z, y).item() == pytest.approx(expected)
    # weighted mean by hand
    per = -F.log_softmax(z, 1)[torch.arange(16), y]
    assert expected == pytest.approx(((per * w[y]).sum() / w[y].sum()).item(), rel=1e-6)


def test_focal_reduces_to_ce_at_gamma_zero(batch):
    z, y = batch
    w = torch.tensor([1.0, 0.5, 2.0, 3.0])
    cfg = TrainingConfig(loss="focal", focal_gamma=0.0)
    assert L.build_loss(cfg, "severity", COUNTS, w, 1)(z, y).item() == pytest.approx(
        F.cross_entropy(z, y, weight=w).item(), rel=1e-6)
    cfg = TrainingConfig(loss="focal", focal_gamma=0.0, label_smoothing=0.1)
    assert L.build_loss(cfg, "severity", COUNTS, None, 1)(z, y).item() == pytest.approx(
        F.cross_entropy(z, y, label_smoothing=0.1).item(), rel=1e-6)


def test_focal_hand_computed():
    z = torch.tensor([[2.0, 0.0, 0.0, 0.0]])
    y = torch.tensor([0])
    p = math.exp(2) / (math.exp(2) + 3)
    expected = 0.25 * (1 - p) ** 2 * -math.log(p)
    cfg = TrainingConfig(loss="focal", focal_gamma=2.0, focal_alpha=0.25)
    assert L.build_loss(cfg, "severity", COUNTS, None, 1)(z, y).item() == pytest.approx(expected, rel=1e-6)


def test_balanced_softmax_is_ce_with_log_prior_shift(batch):
    z, y = batch
    cfg = TrainingConfig(loss="balanced_softmax")
    prior = COUNTS / COUNTS.sum()
    shifted = z + torch.as_tensor(np.log(prior), dtype=torch.float32)
    assert L.build_loss(cfg, "severity", COUNTS, None, 1)(z, y).item() == pytest.approx(
        F.cross_entropy(shifted, y).item(), rel=1e-5)
    # logit adjusted with tau = 1 is the same loss (softmax is shift invariant)
    la = L.build_loss(TrainingConfig(loss="logit_adjusted", la_tau=1.0), "severity", COUNTS, None, 1)
    assert la(z, y).item() == pytest.approx(F.cross_entropy(shifted, y).item(), rel=1e-5)
    la2 = L.build_loss(TrainingConfig(loss="logit_adjusted", la_tau=2.0), "severity", COUNTS, None, 1)
    shifted2 = z + 2.0 * torch.as_tensor(np.log(prior), dtype=torch.float32)
    assert la2(z, y).item() == pytest.approx(F.cross_entropy(shifted2, y).item(), rel=1e-5)


def test_ldam_margins_and_drw(batch):
    m = L.ldam_margins(COUNTS, 0.5)
    assert m.max() == pytest.approx(0.5) and m.argmax() == 3
    assert m[1] / m[3] == pytest.approx((27 / 1303) ** 0.25)          # m ~ n^(-1/4)
    z, y = batch
    cfg = TrainingConfig(loss="ldam", ldam_max_margin=0.5, ldam_scale=10.0, drw_phase=3)
    mt = torch.as_tensor(m, dtype=torch.float32)
    by_hand = z.clone()
    by_hand[torch.arange(16), y] -= mt[y]
    assert L.build_loss(cfg, "severity", COUNTS, None, 2)(z, y).item() == pytest.approx(
        F.cross_entropy(10.0 * by_hand, y).item(), rel=1e-5)          # before DRW: unweighted
    w = torch.as_tensor(class_weights(COUNTS, cfg.max_weight_phase3), dtype=torch.float32)
    assert L.build_loss(cfg, "severity", COUNTS, None, 3)(z, y).item() == pytest.approx(
        F.cross_entropy(10.0 * by_hand, y, weight=w).item(), rel=1e-5)  # from drw_phase on: weighted


def test_losses_are_differentiable(batch):
    z, y = batch
    for name in L.LOSSES:
        zz = z.clone().requires_grad_(True)
        value = L.build_loss(TrainingConfig(loss=name, ldam_scale=1.0), "severity", COUNTS, None, 3)(zz, y)
        value.backward()
        assert torch.isfinite(value) and torch.isfinite(zz.grad).all(), name


def test_multitask_loss_weights_and_unknown_targets():
    g = torch.Generator().manual_seed(1)
    out = {"action": torch.randn(6, 8, generator=g), "severity": torch.randn(6, 4, generator=g)}
    tgt = {"action": torch.tensor([0, 1, 2, 3, 4, -1]), "severity": torch.tensor([0, 1, 2, 3, 0, 1])}
    cfg = TrainingConfig(loss="ce", loss_weight_action=2.0, loss_weight_severity=0.5)
    losses = {t: L.build_loss(cfg, t, np.ones(n) * 10, None, 1) for t, n in (("action", 8), ("severity", 4))}
    total, parts = L.multitask_loss(losses, out, tgt, cfg)
    a = F.cross_entropy(out["action"][:5], tgt["action"][:5]).item()
    s = F.cross_entropy(out["severity"], tgt["severity"]).item()
    assert parts == pytest.approx({"action": a, "severity": s})
    assert total.item() == pytest.approx(2.0 * a + 0.5 * s, rel=1e-6)


def test_posthoc_adjust_and_choose_tau():
    prior = np.array([0.7, 0.2, 0.1])
    z = np.zeros((1, 3))
    adjusted = L.posthoc_adjust(z, prior, 1.0)
    assert adjusted == pytest.approx(-np.log(prior)[None])
    assert torch.allclose(L.posthoc_adjust(torch.zeros(1, 3), prior, 1.0),
                          torch.as_tensor(-np.log(prior)[None], dtype=torch.float32))
    # a classifier biased towards the head class: log-prior logits plus a weak signal
    rng = np.random.default_rng(0)
    y = rng.choice(3, size=600, p=prior)
    logits = np.log(prior)[None] * 1.5 + 0.8 * np.eye(3)[y] + rng.normal(scale=0.3, size=(600, 3))
    taus = L.tau_grid(2.0)
    assert taus.tolist() == [0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0]
    best = L.choose_tau(logits, y, prior, taus)
    scores = {t: balanced_accuracy_score(y, L.posthoc_adjust(logits, prior, t).argmax(1)) for t in taus}
    assert scores[best] == max(scores.values())
    assert best == min(t for t in taus if scores[t] == max(scores.values()))
    assert best > 0 and scores[best] > scores[0.0] + 0.1
