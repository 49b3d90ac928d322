"""Paired statistics for A/B verdicts: B - A per (seed, fold), bootstrap CI, Wilcoxon test, Holm, MDE.

Every metric here is "higher is better" (leaderboard value, macro recall, macro F1, class recall).
A comparison of arm B against the control arm A, for one metric, is:
- the paired differences d_i = B_i - A_i over the (seed, fold) cells both arms finished;
- their mean with a paired bootstrap 95% CI (scipy.stats.bootstrap, BCa);
- a two-sided Wilcoxon signed-rank test (scipy.stats.wilcoxon, Pratt's treatment of zero differences);
- Holm's step-down correction across the metrics of that comparison (family-wise error <= alpha);
- a verdict from the Holm-adjusted p value and the sign of the mean difference;
- the minimum detectable effect (MDE): the true mean difference the design detects with probability `power`
  at level `alpha`, from the paired SD and n (paired t power via the noncentral t, scaled by the Wilcoxon
  test's asymptotic relative efficiency 3/pi under normal differences, at the level the exact test can really
  attain (its p values are discrete for small n). When n is so small that the exact
  Wilcoxon test cannot reach `alpha` at all (2 / 2**n > alpha, e.g. n <= 5 at 0.05) the MDE is infinite.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache

import numpy as np
from scipy import optimize, stats

BETTER = "B better"
WORSE = "B worse"
NO_DIFFERENCE = "no detectable difference"
WILCOXON_ARE = 3.0 / math.pi  # efficiency of the signed-rank test relative to the t test, normal data


def holm(pvalues: Sequence[float]) -> np.ndarray:
    """Holm-Bonferroni adjusted p values (step-down, monotone, capped at 1); NaN stays NaN, not counted."""
    p = np.asarray(pvalues, dtype=float)
    adjusted = np.full_like(p, np.nan)
    valid = np.flatnonzero(~np.isnan(p))
    m = len(valid)
    order = valid[np.argsort(p[valid], kind="stable")]
    running = 0.0
    for rank, idx in enumerate(order):
        running = max(running, (m - rank) * p[idx])
        adjusted[idx] = min(1.0, running)
    return adjusted


def paired_test(diffs: Sequence[float]) -> float:
    """Two-sided Wilcoxon signed-rank p value of paired differences (1.0 when every difference is zero)."""
    d = np.asarray(diffs, dtype=float)
    if len(d) == 0 or np.all(d == 0):
        return 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # zero-variance normal approximation with ties
        p = float(stats.wilcoxon(d, zero_method="pratt", alternative="two-sided").pvalue)
    return 1.0 if math.isnan(p) else p


def min_wilcoxon_p(n: int) -> float:
    """Smallest two-sided p value the exact signed-rank test can give with n non-zero differences."""
    return min(1.0, 2.0 / 2.0 ** n) if n > 0 else 1.0


@lru_cache(maxsize=256)
def attainable_alpha(n: int, alpha: float) -> float:
    """Largest two-sided p value <= alpha the exact signed-rank test can give with n differences.

    The exact test is discrete: with n = 6 the p values jump from 0.03125 to 0.0625, so a test "at 0.05" really
    rejects at 0.03125. Computed from scipy's exact distribution by testing a difference vector whose negative
    ranks sum to k, for k = 0, 1, ... (p grows with k). Above n = 50 scipy uses the normal approximation: alpha.
    """
    if n > 50:
        return alpha
    best = 0.0
    for k in range(n * (n + 1) // 4 + 1):
        negative, remaining = set(), k
        for rank in range(n, 0, -1):  # greedy: any k <= n(n+1)/2 is a sum of distinct ranks
            if rank <= remaining:
                negative.add(rank)
                remaining -= rank
        d = np.array([-r if r in negative else r for r in range(1, n + 1)], dtype=float)
        p = float(stats.wilcoxon(d, method="exact").pvalue)
        if p > alpha:
            break
        best = p
    return best


def minimum_detectable_effect(sd: float, n: int, alpha: float = 0.05, power: float = 0.8) -> float:
    """Smallest true mean difference a two-sided paired Wilcoxon test at `alpha` detects with `power`.

    inf: n too small for the exact test to ever reach `alpha`; NaN: no spread (sd 0 or undefined) to size it by.
    """
    if n < 2 or min_wilcoxon_p(n) > alpha:
        return math.inf
    if sd == 0 or math.isnan(sd):
        return math.nan   # every pair differs by the same amount (often 0 = 0): no spread to size an effect by
    df = n - 1
    t_crit = stats.t.ppf(1 - attainable_alpha(n, alpha) / 2, df)

    def t_power(effect: float) -> float:
        nc = effect * math.sqrt(n) / sd
        lower_tail = np.nan_to_num(stats.nct.cdf(-t_crit, df, nc), nan=0.0)  # ~0; scipy gives NaN far out
        return float(stats.nct.sf(t_crit, df, nc) + lower_tail)

    upper = sd * 12.0 / math.sqrt(n)  # noncentrality 12: power ~1 for any n >= 2 that can reach alpha
    effect_t = optimize.brentq(lambda e: t_power(e) - power, 1e-12 * sd, upper)
    return effect_t / math.sqrt(WILCOXON_ARE)


def bootstrap_ci(a: np.ndarray, b: np.ndarray, confidence: float = 0.95, n_resamples: int = 4999,
                 seed: int = 0) -> tuple[float, float]:
    """Paired bootstrap CI of mean(b - a) (BCa; percentile when BCa is degenerate)."""
    d = b - a
    if len(d) < 2 or np.all(d == d[0]):
        return float(d.mean()), float(d.mean())

    def mean_diff(x, y, axis=-1):
        return np.mean(y - x, axis=axis)

    for method in ("BCa", "percentile"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = stats.bootstrap((a, b), mean_diff, paired=True, vectorized=True, n_resamples=n_resamples,
                                  confidence_level=confidence, method=method, rng=np.random.default_rng(seed))
        low, high = res.confidence_interval
        if np.isfinite(low) and np.isfinite(high):
            return float(low), float(high)
    return float("nan"), float("nan")


def mean_ci(values: Sequence[float], confidence: float = 0.95, n_resamples: int = 1999,
            seed: int = 0) -> tuple[float, float, float]:
    """(mean, low, high): bootstrap CI of the mean of one arm's per-cell values (NaN bounds for n < 2)."""
    x = np.asarray(values, dtype=float)
    x = x[~np.isnan(x)]
    if len(x) == 0:
        return math.nan, math.nan, math.nan
    if len(x) < 2 or np.all(x == x[0]):
        return float(x.mean()), (float(x[0]) if len(x) > 1 else math.nan), (float(x[0]) if len(x) > 1 else math.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = stats.bootstrap((x,), np.mean, vectorized=True, n_resamples=n_resamples, confidence_level=confidence,
                              method="percentile", rng=np.random.default_rng(seed))
    return float(x.mean()), float(res.confidence_interval.low), float(res.confidence_interval.high)


@dataclass(frozen=True)
class MetricComparison:
    """One metric of one comparison (arm B against control arm A)."""

    metric: str
    control: str
    arm: str
    n: int                 # paired (seed, fold) cells
    mean_a: float
    mean_b: float
    diff: float            # mean of B - A
    ci_low: float
    ci_high: float
    sd_diff: float
    p_value: float
    p_holm: float
    verdict: str
    mde: float             # at alpha, power (one metric)
    mde_holm: float        # at alpha / m (Holm's first, strictest step): what the corrected design can detect

    def as_dict(self) -> dict:
        return asdict(self)


def verdict(diff: float, p_adjusted: float, alpha: float = 0.05) -> str:
    if not math.isnan(p_adjusted) and p_adjusted < alpha and diff != 0:
        return BETTER if diff > 0 else WORSE
    return NO_DIFFERENCE


def compare(a: dict[str, Sequence[float]], b: dict[str, Sequence[float]], control: str = "A", arm: str = "B",
            alpha: float = 0.05, power: float = 0.8, n_resamples: int = 4999,
            seed: int = 0) -> list[MetricComparison]:
    """Compare arm B with control A on every metric both have; values are aligned by (seed, fold) order.

    a[metric] and b[metric] are equally long sequences of per-cell values, cell i of A paired with cell i of B.
    NaN pairs (a metric missing in a cell) are dropped for that metric only.
    """
    metrics = [m for m in a if m in b]
    rows = []
    for metric in metrics:
        x, y = np.asarray(a[metric], dtype=float), np.asarray(b[metric], dtype=float)
        if x.shape != y.shape:
            raise ValueError(f"metric {metric}: {len(x)} control cells vs {len(y)} arm cells")
        keep = ~(np.isnan(x) | np.isnan(y))
        x, y = x[keep], y[keep]
        d = y - x
        n = len(d)
        sd = float(d.std(ddof=1)) if n > 1 else math.nan
        low, high = bootstrap_ci(x, y, 1 - alpha, n_resamples, seed) if n else (math.nan, math.nan)
        rows.append({"metric": metric, "n": n, "mean_a": float(x.mean()) if n else math.nan,
                         "mean_b": float(y.mean()) if n else math.nan, "diff": float(d.mean()) if n else math.nan,
                         "ci_low": low, "ci_high": high, "sd_diff": sd, "p_value": paired_test(d) if n else math.nan})
    adjusted = holm([r["p_value"] for r in rows])
    m = max(1, int(np.sum(~np.isnan(adjusted))))
    out = []
    for r, p_adj in zip(rows, adjusted):
        out.append(MetricComparison(
            control=control, arm=arm, p_holm=float(p_adj), verdict=verdict(r["diff"], p_adj, alpha),
            mde=minimum_detectable_effect(r["sd_diff"], r["n"], alpha, power),
            mde_holm=minimum_detectable_effect(r["sd_diff"], r["n"], alpha / m, power), **r))
    return out
