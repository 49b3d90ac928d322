"""A/B statistics on simulated experiments with a known effect and with none."""
from __future__ import annotations

import math

import numpy as np
import pytest

from mvfouls_ab.stats import (
    BETTER,
    NO_DIFFERENCE,
    WORSE,
    attainable_alpha,
    bootstrap_ci,
    compare,
    holm,
    minimum_detectable_effect,
    paired_test,
)


def test_holm_matches_hand_example() -> None:
    # p sorted: 0.005 (x4) = 0.02, 0.01 (x3) = 0.03, 0.03 (x2) = 0.06, 0.04 (x1) = 0.04 -> monotone 0.06
    np.testing.assert_allclose(holm([0.01, 0.04, 0.03, 0.005]), [0.03, 0.06, 0.06, 0.02])
    # capped at 1, NaN ignored (m = 2)
    out = holm([0.9, float("nan"), 0.2, 0.7])  # m = 3: 0.2*3 = 0.6, 0.7*2 = 1.4 -> 1, 0.9 -> 1
    np.testing.assert_allclose(out[[0, 2, 3]], [1.0, 0.6, 1.0])
    assert math.isnan(out[1])
    # Holm rejects exactly what the step-down rule rejects at alpha 0.05
    p = [0.001, 0.011, 0.02, 0.04, 0.3]
    assert list(holm(p) < 0.05) == [True, True, False, False, False]  # 0.02 * 3 = 0.06 stops the procedure


def test_exact_wilcoxon_levels_and_tiny_designs() -> None:
    assert attainable_alpha(6, 0.05) == pytest.approx(0.03125)  # 2/64: next level is 4/64 = 0.0625
    assert attainable_alpha(10, 0.05) <= 0.05
    # with 2 seeds x 2 folds no paired test can reach 0.05: the design cannot detect anything
    assert minimum_detectable_effect(1.0, 4) == math.inf
    assert minimum_detectable_effect(1.0, 25) < minimum_detectable_effect(1.0, 10)
    assert minimum_detectable_effect(2.0, 25) == pytest.approx(2 * minimum_detectable_effect(1.0, 25))
    assert paired_test(np.zeros(10)) == 1.0
    assert math.isnan(minimum_detectable_effect(0.0, 10))  # no spread: nothing to size an effect by


@pytest.mark.parametrize("n", [10, 25])
def test_effect_at_the_mde_is_detected_at_the_stated_power(n: int) -> None:
    rng = np.random.default_rng(n)
    sd = 0.04  # e.g. 4 points of macro recall between paired cells
    mde = minimum_detectable_effect(sd, n, alpha=0.05, power=0.8)
    reps = 400
    detected = sum(paired_test(rng.normal(mde, sd, n)) < 0.05 for _ in range(reps))
    # power 0.8 +- 2.5 binomial SE (SE = 0.02 at 400 reps)
    assert 0.75 <= detected / reps <= 0.86, detected / reps
    # and half the MDE is detected clearly less often
    half = sum(paired_test(rng.normal(mde / 2, sd, n)) < 0.05 for _ in range(reps))
    assert half / reps < 0.5


def test_no_effect_false_positive_rate_and_familywise_error() -> None:
    rng = np.random.default_rng(7)
    n, reps, metrics = 25, 600, 10
    single = np.mean([paired_test(rng.normal(0, 1, n)) < 0.05 for _ in range(reps)])
    assert 0.025 <= single <= 0.075, single  # alpha 0.05 +- 2.8 SE
    # Holm keeps the family-wise error at <= alpha across correlated metrics (shared cell noise + own noise)
    family = 0
    for _ in range(200):
        shared = rng.normal(0, 1, n)
        p = [paired_test(shared + rng.normal(0, 1, n)) for _ in range(metrics)]
        family += bool(np.any(holm(p) < 0.05))
    assert family / 200 <= 0.08, family / 200
    # without correction the family-wise error is clearly inflated: the correction matters
    uncorrected = 0
    for _ in range(200):
        shared = rng.normal(0, 1, n)
        uncorrected += any(paired_test(shared + rng.normal(0, 1, n)) < 0.05 for _ in range(metrics))
    assert uncorrected / 200 > 0.15


def test_bootstrap_ci_covers_the_true_difference() -> None:
    rng = np.random.default_rng(3)
    covered = 0
    for _ in range(60):
        a = rng.normal(0.4, 0.05, 25)
        b = a + rng.normal(0.02, 0.03, 25)
        low, high = bootstrap_ci(a, b, n_resamples=999, seed=1)
        assert low < (b - a).mean() < high
        covered += low <= 0.02 <= high
    assert covered / 60 >= 0.85  # nominal 0.95, small-sample BCa a bit under
    assert bootstrap_ci(np.ones(5), np.ones(5) + 0.1) == pytest.approx((0.1, 0.1))


def test_compare_gives_verdicts_per_metric() -> None:
    rng = np.random.default_rng(11)
    n = 25
    cell_noise = rng.normal(0, 0.03, n)  # (seed, fold) effects shared by both arms: why pairing helps
    a = {"val/leaderboard": 0.40 + cell_noise + rng.normal(0, 0.01, n),
         "val/action/macro_recall": 0.45 + cell_noise + rng.normal(0, 0.01, n),
         "val/severity/recall/red_card": 0.30 + cell_noise + rng.normal(0, 0.01, n)}
    b = {"val/leaderboard": a["val/leaderboard"] + 0.03 + rng.normal(0, 0.01, n),       # better
         "val/action/macro_recall": a["val/action/macro_recall"] + rng.normal(0, 0.01, n),  # same
         "val/severity/recall/red_card": a["val/severity/recall/red_card"] - 0.05 + rng.normal(0, 0.01, n)}
    rows = {r.metric: r for r in compare(a, b, control="baseline", arm="simplified", n_resamples=999)}
    assert rows["val/leaderboard"].verdict == BETTER
    assert rows["val/action/macro_recall"].verdict == NO_DIFFERENCE
    assert rows["val/severity/recall/red_card"].verdict == WORSE
    lb = rows["val/leaderboard"]
    assert lb.n == n and lb.ci_low < lb.diff < lb.ci_high and lb.ci_low > 0
    assert lb.p_holm >= lb.p_value and lb.mde_holm > lb.mde > 0
    assert lb.control == "baseline" and lb.arm == "simplified"


def test_compare_handles_missing_cells_and_identical_arms() -> None:
    a = {"m": [0.5, 0.6, float("nan"), 0.7], "same": [0.1, 0.2, 0.3, 0.4]}
    b = {"m": [0.6, 0.7, 0.9, 0.8], "same": [0.1, 0.2, 0.3, 0.4]}
    rows = {r.metric: r for r in compare(a, b, n_resamples=199)}
    assert rows["m"].n == 3 and rows["m"].diff == pytest.approx(0.1)
    assert rows["m"].verdict == NO_DIFFERENCE and rows["m"].mde == math.inf  # n = 3 cannot reach 0.05
    assert rows["same"].p_value == 1.0 and rows["same"].verdict == NO_DIFFERENCE
    with pytest.raises(ValueError):
        compare({"m": [1.0, 2.0]}, {"m": [1.0]})
