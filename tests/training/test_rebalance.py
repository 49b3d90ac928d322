import numpy as np
import pytest
import torch

from mvfouls_ab.errors import ConfigError
from mvfouls_ab.training.rebalance import (
    balanced_subset,
    class_weights,
    parse_oversample,
    sample_weights,
    targeted_weights,
    weighted_sampler,
)

SEVERITY = np.array([304, 1303, 685, 27])           # real Train counts after the official filter
ACTION = np.array([357, 1038, 90, 273, 73, 124, 336, 28])


def labels_like_train(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """2,319 samples with the real Train marginals (severity assigned at random)."""
    rng = np.random.default_rng(seed)
    action = np.repeat(np.arange(8), ACTION)
    severity = rng.permutation(np.repeat(np.arange(4), SEVERITY))
    return action, severity


def test_class_weights_normalization_and_caps():
    inv = 1.0 / SEVERITY
    raw = inv / inv.mean()
    assert class_weights(SEVERITY, None) == pytest.approx(raw)
    assert class_weights(SEVERITY, None).mean() == pytest.approx(1.0)
    assert class_weights(SEVERITY, None) == pytest.approx([0.30920593, 0.07214014, 0.13722424, 3.4814297])
    for cap in (1.5, 3.0, 5.0, 10.0):
        w = class_weights(SEVERITY, cap)
        # the cap is the largest weight over the smallest (not cap^2 around the mean), mean 1
        assert w.max() / w.min() == pytest.approx(cap) and w.mean() == pytest.approx(1.0)
        by_hand = np.minimum(SEVERITY.max() / SEVERITY, cap)
        assert w == pytest.approx(by_hand / by_hand.mean())
    assert class_weights(SEVERITY, 3.0) == pytest.approx([1.348, 0.449, 0.855, 1.348], abs=1e-3)
    w = class_weights(ACTION, 10.0)
    assert w.max() / w.min() <= 10.0 + 1e-9
    # an absent class gets 1; normalization runs over the present classes only
    w = class_weights([10, 0, 30], None)
    assert w.tolist() == pytest.approx([1.5, 1.0, 0.5])
    with pytest.raises(ConfigError, match="max_weight"):
        class_weights(SEVERITY, 0.5)


def test_targeted_weights_boost_weak_classes():
    base = 1.0 / SEVERITY
    w = targeted_weights(SEVERITY, [0.6, 0.8, 0.45, 0.0], cap=None)
    boosted = base * [1, 1, 1, 2]                           # 0% recall: doubled; at or above 45%: unchanged
    assert w == pytest.approx(boosted / boosted.mean())
    w = targeted_weights(SEVERITY, [0.6, 0.8, 0.225, float("nan")], cap=None)
    assert w[2] / w[1] == pytest.approx(1.5 * base[2] / base[1]) and w[3] / w[1] == pytest.approx(base[3] / base[1])
    w = targeted_weights(SEVERITY, [0, 0, 0, 0], cap=5.0)
    assert w.max() / w.min() == pytest.approx(5.0) and w.mean() == pytest.approx(1.0)


def test_sample_weights_kinds():
    action, severity = labels_like_train()
    n = action.size
    assert sample_weights(action, severity, "none").tolist() == [1.0] * n
    w = sample_weights(action, severity, "balanced")
    assert w.mean() == pytest.approx(1.0)
    # arithmetic mean of the two per-task balanced weights, by hand for one sample
    i = 0
    expected = 0.5 * (n / (8 * ACTION[action[i]]) + n / (4 * SEVERITY[severity[i]]))
    assert w[i] == pytest.approx(expected)
    # every class of each task gets at least half of its class-balanced mass (n / C)
    for y, c in ((action, 8), (severity, 4)):
        mass = np.bincount(y, weights=w, minlength=c)
        assert (mass >= n / c / 2 - 1e-9).all()
    sq = sample_weights(action, severity, "sqrt")
    by_hand = 0.5 * ((1 / np.sqrt(ACTION[action])) / (1 / np.sqrt(ACTION[action])).mean()
                     + (1 / np.sqrt(SEVERITY[severity])) / (1 / np.sqrt(SEVERITY[severity])).mean())
    assert sq == pytest.approx(by_hand / by_hand.mean())
    assert sample_weights(action, severity, "progressive", progress=0.0) == pytest.approx(np.ones(n))
    assert sample_weights(action, severity, "progressive", progress=1.0) == pytest.approx(w)
    half = sample_weights(action, severity, "progressive", progress=0.5)
    assert half == pytest.approx(0.5 * np.ones(n) + 0.5 * w)


def test_oversample_multiplies_classes():
    action, severity = labels_like_train()
    assert parse_oversample("severity:3=8, action:dive=4") == {("severity", 3): 8.0, ("action", 7): 4.0}
    base = sample_weights(action, severity, "none")
    w = sample_weights(action, severity, "none", oversample="severity:3=8,action:7=4")
    factor = np.where(severity == 3, 8.0, 1.0) * np.where(action == 7, 4.0, 1.0)
    assert w == pytest.approx(base * factor / (base * factor).mean())
    for bad in ("severity:9=2", "sev:1=2", "severity:1", "severity:1=-3"):
        with pytest.raises(ConfigError, match="oversample"):
            parse_oversample(bad)


def test_weighted_sampler_draws_by_weight():
    w = np.array([1.0, 1.0, 8.0])
    sampler = weighted_sampler(w, num_samples=5000, generator=torch.Generator().manual_seed(0))
    draws = np.bincount(list(sampler), minlength=3) / 5000
    assert draws == pytest.approx([0.1, 0.1, 0.8], abs=0.03)


def test_balanced_subset_rule_and_determinism():
    action, severity = labels_like_train()
    idx = balanced_subset(action, severity, np.random.default_rng(3))
    m = 2 * 27                                              # factor 2 x the rarest class (27 red cards)
    a, s = np.bincount(action[idx], minlength=8), np.bincount(severity[idx], minlength=4)
    assert (a >= np.minimum(m, ACTION)).all() and (s >= np.minimum(m, SEVERITY)).all()
    assert a.tolist() == [m] * 7 + [28]                     # action classes exactly m (Dive: all 28)
    assert s[3] == 27                                       # every red card
    assert s[:3].max() - s[:3].min() <= 2                   # overflow spread evenly over the other classes
    assert len(set(idx.tolist())) == idx.size and (np.diff(idx) > 0).all()
    assert np.array_equal(idx, balanced_subset(action, severity, np.random.default_rng(3)))
    assert not np.array_equal(idx, balanced_subset(action, severity, np.random.default_rng(4)))
    idx = balanced_subset(action, severity, np.random.default_rng(3), per_class=100)
    assert (np.bincount(action[idx], minlength=8) >= np.minimum(100, ACTION)).all()
