import math
from itertools import pairwise

import numpy as np
import pytest
import torch
from scipy.special import log_softmax

from mvfouls_ab.training.curriculum import curriculum_indices, difficulty, pacing_fraction


def test_difficulty_loss_and_margin_by_hand():
    logits = {"action": np.array([[2.0, 0.0, 1.0] + [0.0] * 5, [0.0] * 8]),
              "severity": torch.tensor([[0.0, 3.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])}
    targets = {"action": np.array([0, 7]), "severity": np.array([1, -1])}
    d = difficulty(logits, targets, "loss")
    expected0 = -log_softmax(logits["action"][0])[0] - log_softmax(logits["severity"][0].numpy())[1]
    expected1 = -log_softmax(logits["action"][1])[7]            # severity unknown: adds 0
    assert d == pytest.approx([expected0, expected1])
    m = difficulty(logits, targets, "margin")
    assert m == pytest.approx([(1.0 - 2.0) + (0.0 - 3.0), 0.0])


def test_pacing_functions():
    assert pacing_fraction(0, 11, 0.4, "linear", 0.6) == pytest.approx(0.4)
    assert pacing_fraction(3, 11, 0.4, "linear", 0.6) == pytest.approx(0.4 + 0.6 * (0.3 / 0.6))
    assert pacing_fraction(6, 11, 0.4, "linear", 0.6) == pytest.approx(1.0)
    assert pacing_fraction(10, 11, 0.4, "linear", 0.6) == pytest.approx(1.0)
    assert pacing_fraction(3, 11, 0.4, "root", 0.6) == pytest.approx(math.sqrt(0.16 + 0.84 * 0.5))
    assert [pacing_fraction(e, 11, 0.4, "step", 0.6) for e in (0, 1, 2, 4, 6)] == pytest.approx(
        [0.4, 0.4, 0.6, 0.8, 1.0])
    for pacing in ("linear", "root", "step"):
        values = [pacing_fraction(e, 15, 0.3, pacing, 0.6) for e in range(15)]
        assert values[0] == pytest.approx(0.3) and values[-1] == 1.0
        assert all(b >= a for a, b in pairwise(values))
    assert pacing_fraction(0, 1, 0.4, "linear", 0.6) == 1.0


def imbalanced(n: int = 600, seed: int = 0):
    rng = np.random.default_rng(seed)
    action = rng.choice(8, size=n, p=[0.15, 0.45, 0.04, 0.12, 0.03, 0.05, 0.14, 0.02])
    severity = rng.choice(4, size=n, p=[0.13, 0.56, 0.29, 0.02])
    d = rng.random(n)
    d[action == 7] += 5.0                                    # the rare classes are the hardest
    d[severity == 3] += 5.0
    return d, action, severity


def test_every_class_every_epoch_and_easy_first():
    d, action, severity = imbalanced()
    n_epochs = 10
    sizes = []
    for epoch in range(n_epochs):
        idx = curriculum_indices(d, action, severity, epoch, n_epochs, 0.3, "linear", 0.6, np.random.default_rng(0))
        assert set(action[idx]) == set(range(8)) and set(severity[idx]) == set(range(4))
        frac = pacing_fraction(epoch, n_epochs, 0.3, "linear", 0.6)
        assert idx.size >= math.ceil(frac * d.size - 1e-9)
        sizes.append(idx.size)
        for k in range(8):                                   # proportional share of each class, its easiest first
            members = np.flatnonzero(action == k)
            assert (action[idx] == k).sum() >= min(members.size, math.ceil(frac * members.size - 1e-9))
    assert sizes[-1] == d.size and all(b >= a for a, b in pairwise(sizes))
    # epoch 0: the global easy pick is the easiest 30%; rare hard classes enter only through coverage
    idx = curriculum_indices(d, action, severity, 0, n_epochs, 0.3, "linear", 0.6, np.random.default_rng(0),
                             min_class_share=0.0)
    assert (action[idx] == 7).sum() == 1 and (severity[idx] == 3).sum() >= 1
    easy = np.sort(np.argsort(d)[: math.ceil(0.3 * d.size)])
    assert set(easy) <= set(idx.tolist()) and idx.size <= easy.size + 2
    added_dive = next(i for i in idx if i not in set(easy) and action[i] == 7)
    assert d[added_dive] == d[action == 7].min()             # the easiest Dive was added


def test_deterministic_for_rng_with_ties():
    d = np.zeros(200)                                        # all ties: the rng decides
    rng = np.random.default_rng(1)
    action, severity = rng.integers(0, 8, 200), rng.integers(0, 4, 200)
    a = curriculum_indices(d, action, severity, 0, 5, 0.5, "root", 0.6, np.random.default_rng(7))
    b = curriculum_indices(d, action, severity, 0, 5, 0.5, "root", 0.6, np.random.default_rng(7))
    c = curriculum_indices(d, action, severity, 0, 5, 0.5, "root", 0.6, np.random.default_rng(8))
    assert np.array_equal(a, b) and not np.array_equal(a, c)
