"""A/B statistics: the corrected resampled t-test on simulated r x k-fold experiments with a known effect and none."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps

from mvfouls_ab.orchestration.stats import (
    BETTER,
    EFFICIENCY,
    NO_DIFFERENCE,
    QUALITY,
    WORSE,
    compare,
    corrected_t_test,
    direction,
    family,
    holm,
    minimum_detectable_effect,
    verdict,
    wilcoxon_test,
)


def equicorrelated(rng: np.random.Generator, reps: int, n: int, rho: float, sd: float = 1.0) -> np.ndarray:
    """[reps, n] differences, every pair of cells correlated rho (the model the correction is exact under)."""
    return sd * (math.sqrt(rho) * rng.normal(size=(reps, 1)) + math.sqrt(1 - rho) * rng.normal(size=(reps, n)))


def test_holm_matches_hand_example() -> None:
    # p sorted: 0.005 (x4) = 0.02, 0.01 (x3) = 0.03, 0.03 (x2) = 0.06, 0.04 (x1) = 0.04 -> monotone 0.06
    np.testing.assert_allclose(holm([0.01, 0.04, 0.03, 0.005]), [0.03, 0.06, 0.06, 0.02])
    out = holm([0.9, float("nan"), 0.2, 0.7])  # m = 3: 0.2*3 = 0.6, 0.7*2 = 1.4 -> 1, 0.9 -> 1
    np.testing.assert_allclose(out[[0, 2, 3]], [1.0, 0.6, 1.0])
    assert math.isnan(out[1])
    p = [0.001, 0.011, 0.02, 0.04, 0.3]
    assert list(holm(p) < 0.05) == [True, True, False, False, False]  # 0.02 * 3 = 0.06 stops the procedure


def test_direction_and_family_rules() -> None:
    assert direction("heldout/leaderboard") == "higher" and direction("heldout/action/recall/dive") == "higher"
    assert direction("val/loss") == "lower" and direction("train_loss_ema") == "lower"
    assert direction("system/wall_s") == "lower" and direction("system/peak_rss_mb") == "lower"
    assert direction("accuracy_sd") == "higher"          # only a trailing _s counts
    assert family("system/wall_s") == EFFICIENCY and family("heldout/loss") == QUALITY
    assert verdict(+0.1, 0.01) == BETTER and verdict(-0.1, 0.01) == WORSE and verdict(0.1, 0.2) == NO_DIFFERENCE
    assert verdict(-2.0, 0.01, better="lower") == BETTER and verdict(+2.0, 0.01, better="lower") == WORSE


def test_corrected_t_matches_the_formula() -> None:
    rng = np.random.default_rng(1)
    d = rng.normal(0.02, 0.05, 25)
    k = 5
    res = corrected_t_test(d, k, alpha=0.05)
    se = d.std(ddof=1) * math.sqrt(1 / 25 + 1 / (k - 1))       # Nadeau-Bengio: (1/(kr) + n2/n1) s^2
    assert res.se == pytest.approx(se) and res.df == 24
    assert res.t == pytest.approx(d.mean() / se)
    assert res.p_value == pytest.approx(2 * sps.t.sf(abs(d.mean() / se), 24))
    half = sps.t.ppf(0.975, 24) * se                              # the CI uses the same SE
    assert (res.ci_low, res.ci_high) == pytest.approx((d.mean() - half, d.mean() + half))
    # the naive paired t-test's SE is far smaller: the correction is what makes the test honest
    assert res.se > 2.5 * d.std(ddof=1) / math.sqrt(25)
    assert corrected_t_test(d, k, ratio=0.5).se == pytest.approx(d.std(ddof=1) * math.sqrt(1 / 25 + 0.5))


def test_degenerate_inputs() -> None:
    assert corrected_t_test(np.zeros(10), 5).p_value == 1.0
    const = corrected_t_test(np.full(2, 0.25), 2)   # e.g. one rare class's recall, 2 cells: no evidence
    assert math.isnan(const.p_value) and const.ci_low == const.ci_high == pytest.approx(0.25)
    assert verdict(const.mean, holm([const.p_value])[0]) == NO_DIFFERENCE
    assert math.isnan(corrected_t_test([0.3], 5).p_value) and corrected_t_test([], 5).n == 0
    assert corrected_t_test([0.1, np.nan, 0.2, 0.3], 3).n == 3
    with pytest.raises(ValueError, match="2 folds"):
        corrected_t_test([0.1, 0.2], 1)
    assert minimum_detectable_effect(1.0, 1, 5) == math.inf
    assert math.isnan(minimum_detectable_effect(0.0, 10, 5))
    assert wilcoxon_test(np.zeros(10)) == 1.0


def test_false_positive_rate_under_equicorrelated_folds() -> None:
    """rho = 1/k (5 seeds x 5 folds): the corrected test holds alpha; the old Wilcoxon does not."""
    rng = np.random.default_rng(7)
    k, n, reps = 5, 25, 1500
    d = equicorrelated(rng, reps, n, 1 / k)
    corrected = np.mean([corrected_t_test(row, k).p_value < 0.05 for row in d])
    assert 0.035 <= corrected <= 0.065, corrected                 # alpha 0.05 +- 2.7 SE
    old = np.mean([wilcoxon_test(row) < 0.05 for row in d[:300]])
    assert old > 0.3, old                                         # about half: the bug this test fixes
    independent = equicorrelated(rng, 500, n, 0.0)                # independent cells: conservative, never liberal
    assert np.mean([corrected_t_test(row, k).p_value < 0.05 for row in independent]) < 0.02


@pytest.mark.parametrize("n_seeds", [2, 5])
def test_effect_at_the_mde_is_detected_at_the_stated_power(n_seeds: int) -> None:
    rng = np.random.default_rng(n_seeds)
    k, sd, reps = 5, 0.04, 800
    n = n_seeds * k
    # the MDE from the expected sample SD under rho = 1/k: sd_diff = sd * sqrt(1 - rho)
    mde = minimum_detectable_effect(sd * math.sqrt(1 - 1 / k), n, k, alpha=0.05, power=0.8)
    d = equicorrelated(rng, reps, n, 1 / k, sd) + mde
    detected = np.mean([corrected_t_test(row, k).p_value < 0.05 for row in d])
    assert 0.75 <= detected <= 0.86, detected                     # power 0.8 +- 2.5 SE (SE 0.014)
    half = np.mean([corrected_t_test(row, k).p_value < 0.05 for row in d - mde / 2])
    assert half < 0.45


def test_effect_of_three_standard_errors_has_power_over_80_percent() -> None:
    """The issue's power target: an effect of 3 (true) standard errors of the mean difference, 5 x 5 cells."""
    rng = np.random.default_rng(3)
    k, n, rho, reps = 5, 25, 0.2, 1500
    true_se = math.sqrt(rho + (1 - rho) / n)
    d = equicorrelated(rng, reps, n, rho) + 3 * true_se
    power = np.mean([corrected_t_test(row, k).p_value < 0.05 for row in d])
    assert power >= 0.78, power                                   # 0.82 expected (noncentral t, df 24, nc 3)


def test_holm_keeps_the_familywise_error_and_efficiency_is_its_own_family() -> None:
    rng = np.random.default_rng(5)
    k, n, metrics, reps = 5, 25, 8, 300
    family_errors = 0
    for _ in range(reps):
        shared = equicorrelated(rng, 1, n, 0.2)[0]
        a = {f"m{j}": np.zeros(n) for j in range(metrics)}
        b = {f"m{j}": 0.7 * shared + 0.7 * equicorrelated(rng, 1, n, 0.2)[0] for j in range(metrics)}
        rows = compare(a, b, k)
        family_errors += any(r.verdict != NO_DIFFERENCE for r in rows)
    assert family_errors / reps <= 0.08, family_errors / reps
    # adding efficiency metrics leaves the quality family's adjusted p values untouched
    d = rng.normal(0.02, 0.03, n)
    a = {"heldout/leaderboard": np.full(n, 0.5), "heldout/action/macro_recall": np.full(n, 0.5)}
    b = {"heldout/leaderboard": 0.5 + d, "heldout/action/macro_recall": 0.5 + d[::-1] / 2}
    alone = {r.metric: r.p_adjusted for r in compare(a, b, k)}
    a.update({"system/wall_s": np.full(n, 10.0), "system/peak_rss_mb": np.full(n, 800.0)})
    b.update({"system/wall_s": 10 + rng.normal(0, 1, n), "system/peak_rss_mb": 800 + rng.normal(0, 5, n)})
    rows = {r.metric: r for r in compare(a, b, k)}
    assert {m: rows[m].p_adjusted for m in alone} == pytest.approx(alone)
    assert rows["system/wall_s"].family == EFFICIENCY and rows["system/wall_s"].direction == "lower"


def test_compare_gives_verdicts_per_metric_on_their_own_direction() -> None:
    rng = np.random.default_rng(11)
    n, k = 25, 5
    cell = rng.normal(0, 0.03, n)      # (seed, fold) effects shared by both arms: why pairing helps
    a = {"heldout/leaderboard": 0.40 + cell + rng.normal(0, 0.01, n),
         "heldout/action/macro_recall": 0.45 + cell + rng.normal(0, 0.01, n),
         "heldout/severity/recall/red_card": 0.30 + cell + rng.normal(0, 0.01, n),
         "heldout/loss": 1.5 + cell + rng.normal(0, 0.01, n)}
    b = {"heldout/leaderboard": a["heldout/leaderboard"] + 0.03 + rng.normal(0, 0.01, n),          # better
         "heldout/action/macro_recall": a["heldout/action/macro_recall"] + rng.normal(0, 0.01, n),  # same
         "heldout/severity/recall/red_card": a["heldout/severity/recall/red_card"] - 0.05 + rng.normal(0, 0.01, n),
         "heldout/loss": a["heldout/loss"] - 0.05 + rng.normal(0, 0.01, n)}                         # lower = better
    rows = {r.metric: r for r in compare(a, b, k, control="baseline", arm="simplified")}
    assert rows["heldout/leaderboard"].verdict == BETTER
    assert rows["heldout/action/macro_recall"].verdict == NO_DIFFERENCE
    assert rows["heldout/severity/recall/red_card"].verdict == WORSE
    assert rows["heldout/loss"].verdict == BETTER and rows["heldout/loss"].diff < 0
    lb = rows["heldout/leaderboard"]
    assert lb.n == n and lb.ci_low < lb.diff < lb.ci_high and lb.ci_low > 0
    assert lb.p_adjusted >= lb.p_value and lb.mde_adjusted > lb.mde > 0
    assert lb.control == "baseline" and lb.arm == "simplified" and lb.folds == k and lb.family == QUALITY


def test_compare_handles_missing_cells_and_identical_arms() -> None:
    a = {"m": [0.5, 0.6, float("nan"), 0.7], "same": [0.1, 0.2, 0.3, 0.4]}
    b = {"m": [0.6, 0.7, 0.9, 0.8], "same": [0.1, 0.2, 0.3, 0.4]}
    rows = {r.metric: r for r in compare(a, b, 2)}
    assert rows["m"].n == 3 and rows["m"].diff == pytest.approx(0.1)
    assert rows["same"].p_value == 1.0 and rows["same"].verdict == NO_DIFFERENCE
    with pytest.raises(ValueError):
        compare({"m": [1.0, 2.0]}, {"m": [1.0]}, 2)
