"""Paired statistics for A/B verdicts over repeated cross-validation: the corrected resampled t-test, Holm, MDE.

Which test
    The **corrected resampled t-test** for r x k-fold cross-validation (Nadeau & Bengio 2003, "Inference for the
    generalization error", Machine Learning 52; in the r x k form of Bouckaert & Frank 2004, "Evaluating the
    replicability of significance tests for comparing learning algorithms", PAKDD). With d_i = B_i - A_i the paired
    differences over the n = r k (seed, fold) cells both arms finished, mean d and sample variance s^2 (ddof 1):

        SE^2 = (1 / n + n_test / n_train) * s^2,      t = mean d / SE,      df = n - 1

    and a two-sided p value from Student's t with df degrees of freedom (scipy.stats.t). n_test / n_train is the
    ratio of a cell's scored part to its training part: 1 / (k - 1) for k-fold cross-validation, the value used
    everywhere here (the runner and `ab analyze` alike), so that a CSV of cells gives the verdicts the runner gave.

Why
    The cells are not independent. The k training sets of one seed overlap (any two share (k - 2) / (k - 1) of
    their data), and every arm and seed reuses the same data, so the differences d_i are positively correlated.
    A test that treats them as independent pairs (a plain paired t-test, or the Wilcoxon signed-rank test this
    module used before) estimates Var(mean d) as s^2 / n, far too small: under an equicorrelation rho = 1/k it
    rejects a true null about half the time at alpha 0.05 with 5 seeds x 5 folds (benchmarks/ab_calibration.py).
    Nadeau & Bengio's correction adds n_test / n_train * s^2. If every pair of cells is correlated with
    rho = n_test / (n_test + n_train) (= 1/k for k-fold), E[s^2] = (1 - rho) sigma^2 and the corrected SE^2 equals
    Var(mean d) = sigma^2 (rho + (1 - rho) / n) exactly; moreover s^2 is then independent of mean d and distributed
    as (1 - rho) sigma^2 chi2(n-1) / (n-1), so t follows Student's t(n - 1) exactly and the test holds its level.

Assumptions (what the calibration rests on)
    - The differences are roughly normal (the t test; with n = 25 cells it is robust to moderate skew), with one
      common variance and a common correlation between any two cells of about n_test / (n_test + n_train).
      Real cells share more within a seed than across seeds; the correction is a heuristic there, and the
      benchmark measures its false-positive rate on real A/A runs too.
    - Cells are paired: cell (seed, fold) of B saw the same partition as cell (seed, fold) of A.
    - If the cells are in fact (nearly) independent the test is conservative (its SE is too large), never liberal.
    - The correction sets a floor: however many seeds, SE >= s sqrt(n_test / n_train); more folds lower it.

The rest of a comparison uses the same variance: the CI is mean d +- t_{1-alpha/2, df} SE; the minimum detectable
effect (MDE) is the true mean difference this test detects with probability `power` at `alpha` (noncentral t with
noncentrality delta / SE, df = n - 1), and `mde_adjusted` the same at alpha / m (Holm's first, strictest step);
the report shows all of them. Holm's step-down correction runs across the *quality* metrics of one comparison
(family-wise error <= alpha); efficiency metrics (`system/...`: wall time, peak memory) are a family of their own,
reported but never diluting or diluted by the quality family. Each metric has a direction: a name containing
`loss` or ending in `_s` / `_mb` is lower-is-better, every other one higher-is-better; the verdict ("B better",
"B worse", "no detectable difference") is judged on that direction from the Holm-adjusted p value.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache

import numpy as np
from scipy import optimize, stats

BETTER = "B better"
WORSE = "B worse"
NO_DIFFERENCE = "no detectable difference"
TEST_NAME = "corrected resampled t (Nadeau-Bengio, r x k-fold)"
QUALITY, EFFICIENCY = "quality", "efficiency"
HIGHER, LOWER = "higher", "lower"


def direction(metric: str) -> str:
    """'lower' when a smaller value is better (name contains `loss`, or ends in `_s` / `_mb`), else 'higher'."""
    return LOWER if ("loss" in metric or metric.endswith(("_s", "_mb"))) else HIGHER


def family(metric: str) -> str:
    """The Holm family of a metric: `system/...` (wall time, memory) is efficiency, everything else quality."""
    return EFFICIENCY if metric.startswith("system/") else QUALITY


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


def cv_ratio(n_folds: int) -> float:
    """n_test / n_train of one k-fold cell: 1 / (k - 1)."""
    if n_folds < 2:
        raise ValueError(f"the corrected test needs at least 2 folds, got {n_folds}")
    return 1.0 / (n_folds - 1)


@dataclass(frozen=True)
class TTest:
    """The corrected resampled t-test of one vector of paired differences."""

    n: int
    mean: float
    sd: float          # sample SD of the differences (ddof 1)
    se: float          # corrected standard error of the mean
    df: int
    t: float
    p_value: float
    ci_low: float
    ci_high: float


def corrected_t_test(diffs: Sequence[float], n_folds: int, alpha: float = 0.05,
                     ratio: float | None = None) -> TTest:
    """Two-sided corrected resampled t-test of mean(diffs) = 0 for r x k-fold cells, with its (1 - alpha) CI.

    ratio: n_test / n_train of a cell (default 1 / (n_folds - 1)). NaNs are dropped. With fewer than two
    differences nothing can be tested (p NaN). If every difference is equal: p = 1 when they are all 0; otherwise
    the t statistic is undefined (no spread to size it by) and p is NaN (no verdict, left out of Holm): with few
    cells and a discrete metric (one class's recall over a handful of examples) equal differences are common and
    are no evidence. The CI is then that value.
    """
    d = np.asarray(diffs, dtype=float)
    d = d[~np.isnan(d)]
    n = len(d)
    r = cv_ratio(n_folds) if ratio is None else float(ratio)
    if n == 0:
        return TTest(0, math.nan, math.nan, math.nan, 0, math.nan, math.nan, math.nan, math.nan)
    mean = float(d.mean())
    if n < 2:
        return TTest(1, mean, math.nan, math.nan, 0, math.nan, math.nan, math.nan, math.nan)
    sd = float(d.std(ddof=1))
    df = n - 1
    if sd == 0.0 or not np.isfinite(sd) or np.all(d == d[0]):
        p = 1.0 if mean == 0 else math.nan
        return TTest(n, mean, 0.0, 0.0, df, 0.0 if mean == 0 else math.copysign(math.inf, mean), p, mean, mean)
    se = sd * math.sqrt(1.0 / n + r)
    t = mean / se
    p = float(2.0 * stats.t.sf(abs(t), df))
    half = float(stats.t.ppf(1.0 - alpha / 2.0, df)) * se
    return TTest(n, mean, sd, se, df, t, p, mean - half, mean + half)


@lru_cache(maxsize=1024)
def _detectable_noncentrality(df: int, alpha: float, power: float) -> float:
    """The noncentrality delta / SE at which a two-sided t test (df, alpha) rejects with probability `power`."""
    t_crit = float(stats.t.ppf(1.0 - alpha / 2.0, df))

    def rejection(nc: float) -> float:
        lower = np.nan_to_num(stats.nct.cdf(-t_crit, df, nc), nan=0.0)   # ~0; scipy gives NaN far out
        return float(stats.nct.sf(t_crit, df, nc) + lower) - power

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        upper = 16.0
        while rejection(upper) < 0:      # tiny df at a Holm-corrected alpha needs a large noncentrality
            upper *= 4
            if upper > 1e7:
                return math.inf
        return float(optimize.brentq(rejection, 1e-9, upper))


def minimum_detectable_effect(sd: float, n: int, n_folds: int, alpha: float = 0.05, power: float = 0.8,
                              ratio: float | None = None) -> float:
    """Smallest true mean difference the corrected test at `alpha` detects with `power` (same SE as the test).

    inf: fewer than 2 cells; NaN: no spread (sd 0 or undefined) to size an effect by.
    """
    if n < 2:
        return math.inf
    if sd == 0 or math.isnan(sd):
        return math.nan
    r = cv_ratio(n_folds) if ratio is None else float(ratio)
    return _detectable_noncentrality(n - 1, float(alpha), float(power)) * sd * math.sqrt(1.0 / n + r)


def wilcoxon_test(diffs: Sequence[float]) -> float:
    """The previous test, kept for comparison (benchmarks/ab_calibration.py): two-sided Wilcoxon signed-rank p
    value treating the cells as independent pairs (Pratt's zeros; 1.0 when every difference is zero)."""
    d = np.asarray(diffs, dtype=float)
    d = d[~np.isnan(d)]
    if len(d) == 0 or np.all(d == 0):
        return 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # zero-variance normal approximation with ties
        p = float(stats.wilcoxon(d, zero_method="pratt", alternative="two-sided").pvalue)
    return 1.0 if math.isnan(p) else p


def mean_ci(values: Sequence[float], confidence: float = 0.95, n_resamples: int = 1999,
            seed: int = 0) -> tuple[float, float, float]:
    """(mean, low, high): bootstrap CI of the mean of one arm's per-cell values (NaN bounds for n < 2).

    Descriptive only (the report's bars); verdicts never use it.
    """
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
    """One metric of one comparison (arm B against control arm A). diff, CI and MDE are in the metric's units."""

    arm: str
    metric: str
    n: int                 # paired (seed, fold) cells
    diff: float            # mean of B - A
    ci_low: float
    ci_high: float
    p_value: float
    p_adjusted: float      # Holm over the metric's family in this comparison
    verdict: str
    control: str
    mean_a: float
    mean_b: float
    sd_diff: float
    se: float              # corrected SE of diff (the CI's, the test's and the MDE's)
    df: int
    folds: int             # k of the correction (n_test / n_train = 1 / (k - 1))
    direction: str         # "higher" or "lower" is better
    family: str            # "quality" (Holm family of the verdict) or "efficiency"
    mde: float             # at alpha, power (one metric)
    mde_adjusted: float    # at alpha / m (Holm's first, strictest step): what the corrected design can detect
    test: str = TEST_NAME

    def as_dict(self) -> dict:
        return asdict(self)


def verdict(diff: float, p_adjusted: float, alpha: float = 0.05, better: str = HIGHER) -> str:
    """'B better' / 'B worse' when the adjusted p value is below alpha, judged on the metric's direction."""
    if math.isnan(p_adjusted) or math.isnan(diff) or not p_adjusted < alpha or diff == 0:
        return NO_DIFFERENCE
    return BETTER if (diff > 0) == (better == HIGHER) else WORSE


def compare(a: Mapping[str, Sequence[float]], b: Mapping[str, Sequence[float]], n_folds: int, control: str = "A",
            arm: str = "B", alpha: float = 0.05, power: float = 0.8,
            ratio: float | None = None) -> list[MetricComparison]:
    """Compare arm B with control A on every metric both have; values are aligned by (seed, fold) order.

    a[metric] and b[metric] are equally long sequences of per-cell values, cell i of A paired with cell i of B.
    NaN pairs (a metric missing in a cell) are dropped for that metric only. Holm runs within each family.
    """
    metrics = [m for m in a if m in b]
    rows = []
    for metric in metrics:
        x, y = np.asarray(a[metric], dtype=float), np.asarray(b[metric], dtype=float)
        if x.shape != y.shape:
            raise ValueError(f"metric {metric}: {len(x)} control cells vs {len(y)} arm cells")
        keep = ~(np.isnan(x) | np.isnan(y))
        x, y = x[keep], y[keep]
        test = corrected_t_test(y - x, n_folds, alpha, ratio)
        rows.append({"metric": metric, "n": test.n, "diff": test.mean, "ci_low": test.ci_low,
                     "ci_high": test.ci_high, "p_value": test.p_value,
                     "mean_a": float(x.mean()) if len(x) else math.nan,
                     "mean_b": float(y.mean()) if len(y) else math.nan, "sd_diff": test.sd, "se": test.se,
                     "df": test.df, "direction": direction(metric), "family": family(metric)})
    adjusted = np.full(len(rows), np.nan)
    family_size = {}
    for fam in (QUALITY, EFFICIENCY):
        idx = [i for i, r in enumerate(rows) if r["family"] == fam]
        if idx:
            adjusted[idx] = holm([rows[i]["p_value"] for i in idx])
            family_size[fam] = max(1, int(np.sum(~np.isnan(adjusted[idx]))))
    out = []
    for r, p_adj in zip(rows, adjusted):
        m = family_size.get(r["family"], 1)
        out.append(MetricComparison(
            control=control, arm=arm, p_adjusted=float(p_adj), folds=int(n_folds),
            verdict=verdict(r["diff"], p_adj, alpha, r["direction"]),
            mde=minimum_detectable_effect(r["sd_diff"], r["n"], n_folds, alpha, power, ratio),
            mde_adjusted=minimum_detectable_effect(r["sd_diff"], r["n"], n_folds, alpha / m, power, ratio), **r))
    return out
