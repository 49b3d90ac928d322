"""A/A calibration of the A/B verdicts: how often does the framework cry wolf, and does it see a real effect?

    python benchmarks/ab_calibration.py simulate [--experiments 1000] [--seeds 5] [--folds 5] [--effect-se 3]
    python benchmarks/ab_calibration.py real [--budget-s 600] [--seeds 5] [--folds 5] [--set feature_mode=frozen]

simulate: A/A experiments of seeds x folds cells whose B - A differences are equicorrelated with rho = 1/k (the
    model the corrected resampled t-test assumes: the correlation that overlapping training sets induce), plus an
    independent-cells control (rho = 0). Each experiment is written as the long CSV `arm,seed,fold,metric,value`
    and analysed by the functions `python -m mvfouls_ab.ab analyze` runs (ab.analyze_file: read, check, corrected
    t-test, Holm, verdicts.json), so the figure is the product's. Printed: the false-positive rate at alpha (the
    share of A/A experiments whose primary metric gets "B better" or "B worse"), with a 95% Wilson interval, and the
    power at a true effect of `--effect-se` standard errors of the mean difference; beside each, the previous test
    (Wilcoxon signed-rank over the cells as independent pairs) on the very same cells.
real: real A/A experiments: experiments/ab_seeds.yaml (the recommended recipe against itself under other seeds),
    run by the A/B runner itself (cells, nested selection, verdicts), as many complete experiments as fit in
    --budget-s; each run uses fresh seed offsets. Printed: the runs, their cells, and over all runs and quality
    metrics the share of per-metric verdicts that are not "no detectable difference" (raw p < alpha, and Holm per
    run: any false verdict in a run), for the corrected test and the old Wilcoxon on the same cells.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mvfouls_ab import ab
from mvfouls_ab.orchestration import ab as abtest
from mvfouls_ab.orchestration import stats

PRIMARY = abtest.PRIMARY_METRIC


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion k / n."""
    if n == 0:
        return math.nan, math.nan
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def simulated_cells(rng: np.random.Generator, seeds: int, folds: int, rho: float, effect: float,
                    sd: float = 0.03) -> tuple[str, np.ndarray]:
    """CSV text of one A/A (effect 0) or A/B experiment: primary metric per (arm, seed, fold).

    value = 0.6 + a cell effect both arms share (the fold's difficulty; cancels in B - A) + the arm's own noise,
    equicorrelated rho across its cells; so B - A has SD sd * sqrt(2) and correlation rho between any two cells.
    Returns (the CSV, the B - A differences cell by cell as written).
    """
    n = seeds * folds
    shared = rng.normal(0.0, 0.05, n)
    lines, arms = ["arm,seed,fold,metric,value"], []
    for arm, shift in (("A", 0.0), ("B", effect)):
        own = math.sqrt(rho) * rng.normal() + math.sqrt(1 - rho) * rng.normal(size=n)
        values = [float(v) for v in 0.6 + shared + sd * own + shift]
        lines += [f"{arm},{i // folds},{i % folds},{PRIMARY},{v!r}" for i, v in enumerate(values)]
        arms.append(np.array(values))
    return "\n".join(lines) + "\n", arms[1] - arms[0]


def simulate(args: argparse.Namespace) -> dict:
    rng = np.random.default_rng(args.seed)
    n, k, sd = args.seeds * args.folds, args.folds, 0.03
    results = {}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        csv, out = Path(tmp) / "cells.csv", Path(tmp) / "out"
        for label, rho in ((f"correlated folds (rho = 1/k = {1 / k:.2f})", 1 / k), ("independent cells (rho = 0)", 0.0)):
            se_true = sd * math.sqrt(2) * math.sqrt(rho + (1 - rho) / n)   # true SD of mean(B - A)
            for kind, effect in (("A/A", 0.0), (f"effect {args.effect_se:g} SE", args.effect_se * se_true)):
                new = old = 0
                for _ in range(args.experiments):
                    text, diffs = simulated_cells(rng, args.seeds, args.folds, rho, effect, sd)
                    csv.write_text(text)
                    frame, _ = ab.analyze_file(csv, "A", None, args.alpha, out, report=False)   # = ab analyze
                    row = frame[frame.metric == PRIMARY].iloc[0]
                    new += row.verdict != stats.NO_DIFFERENCE
                    old += stats.wilcoxon_test(diffs) < args.alpha        # the old test, the same cells
                results[(label, kind)] = {"corrected_t": new / args.experiments, "wilcoxon_old": old / args.experiments,
                                          "corrected_t_ci": wilson(new, args.experiments),
                                          "wilcoxon_old_ci": wilson(old, args.experiments)}
    elapsed = time.perf_counter() - t0
    print(f"\nSimulated experiments: {args.experiments} per row, {args.seeds} seeds x {args.folds} folds = {n} cells "
          f"per arm, alpha {args.alpha}, each through ab.analyze_file (the `ab analyze` path); {elapsed:.0f} s\n")
    print(f"{'condition':<36} {'experiments':<18} {'corrected resampled t':<28} {'Wilcoxon (old test)':<26}")
    for (label, kind), r in results.items():
        what = "FPR" if kind == "A/A" else "power"
        lo, hi = r["corrected_t_ci"]
        lo2, hi2 = r["wilcoxon_old_ci"]
        print(f"{label:<36} {kind:<18} {what} {r['corrected_t']:.3f} [{lo:.3f}, {hi:.3f}]     "
              f"{what} {r['wilcoxon_old']:.3f} [{lo2:.3f}, {hi2:.3f}]")
    corr = next(v for (label, kind), v in results.items() if label.startswith("correlated") and kind == "A/A")
    power = next(v for (label, kind), v in results.items() if label.startswith("correlated") and kind != "A/A")
    fpr_ok = 0.02 <= corr["corrected_t"] <= 0.07
    power_ok = power["corrected_t"] >= 0.8
    print(f"\ntargets (correlated folds): FPR in [0.02, 0.07]: {'met' if fpr_ok else 'NOT met'} "
          f"({corr['corrected_t']:.3f}; old test {corr['wilcoxon_old']:.3f}); power >= 0.8 at "
          f"{args.effect_se:g} SE: {'met' if power_ok else 'NOT met'} ({power['corrected_t']:.3f})")
    return {f"{label} / {kind}": v for (label, kind), v in results.items()}


def real(args: argparse.Namespace) -> dict:
    """Complete A/A runs of experiments/ab_seeds.yaml through the runner until the budget is spent."""
    deadline = time.perf_counter() + args.budget_s
    out = Path(args.out or tempfile.mkdtemp(prefix="ab_calibration_"))
    out.mkdir(parents=True, exist_ok=True)
    storage = f"sqlite:///{out / 'optuna.db'}"
    overrides = [f"threads={args.threads}"] + list(args.set or [])
    base = abtest.load_experiment(ROOT / "experiments" / "ab_seeds.yaml", args.seeds, args.folds, None, overrides,
                                  args.epoch_scale)
    from mvfouls_ab.data import load_data

    args.seeds, args.folds, args.epoch_scale = base.seeds, base.folds, base.epoch_scale

    data = load_data(base.base.replace(**base.final))
    runs, per_metric, any_new, any_old, cell_s = [], {"corrected_t": [], "wilcoxon_old": []}, 0, 0, []
    t_start = time.perf_counter()
    while True:
        j = len(runs)
        left = deadline - time.perf_counter()
        expected = (cell_s[-1] * 2 * args.seeds * args.folds) if cell_s else 0.0   # as long as the last run
        if left <= 0 or (cell_s and expected > left):
            break
        a, b = base.arms
        exp = dataclasses.replace(base, name=f"seeds_aa{j}",
                                  arms=(dataclasses.replace(a, seed_offset=2000 * j),
                                        dataclasses.replace(b, seed_offset=2000 * j + 1000)))
        t0 = time.perf_counter()
        summary = abtest.run_worker(exp, storage, None, out / exp.name, data=data, echo=lambda *_: None)
        if summary.failed:
            print(f"[real] run {j}: {len(summary.failed)} cells failed, e.g. {next(iter(summary.failed.values()))}")
            break
        table = abtest.results_table(exp, abtest.CellStore(exp, storage).finished())
        frame = abtest.verdict_frame(abtest.analyze(exp, table))
        quality = frame[frame.family == stats.QUALITY]
        control = table[table.arm == exp.control].set_index(["seed", "fold"])
        treat = table[table.arm != exp.control].set_index(["seed", "fold"])
        old_p = [stats.wilcoxon_test((treat[m] - control[m]).to_numpy()) for m in quality.metric]
        per_metric["corrected_t"] += list(quality.p_value < args.alpha)
        per_metric["wilcoxon_old"] += [p < args.alpha for p in old_p]
        any_new += bool((quality.verdict != stats.NO_DIFFERENCE).any())
        any_old += bool((stats.holm(old_p) < args.alpha).any())
        cell_s.append((time.perf_counter() - t0) / max(1, len(summary.ran)))
        primary = quality[quality.metric == PRIMARY].iloc[0]
        efficiency = frame[frame.family == stats.EFFICIENCY]
        runs.append({"run": exp.name, "cells": len(table), "seconds": round(time.perf_counter() - t0, 1),
                     "primary_diff": float(primary["diff"]), "primary_p": float(primary.p_value),
                     "primary_verdict": primary.verdict,
                     "false_verdicts": int((quality.verdict != stats.NO_DIFFERENCE).sum()),
                     "efficiency": {r.metric: (round(float(r.diff), 3), round(float(r.p_adjusted), 3), r.verdict)
                                    for r in efficiency.itertuples()}})
        print(f"[real] run {j}: {len(table)} cells in {runs[-1]['seconds']} s; {PRIMARY} B - A "
              f"{primary['diff']:+.4f} (p {primary.p_value:.3f}, {primary.verdict}); "
              f"{runs[-1]['false_verdicts']} of {len(quality)} quality metrics with a verdict after Holm; efficiency: "
              + "; ".join(f"{m} {d:+.3f} (Holm p {p:.3f}, {v})" for m, (d, p, v) in runs[-1]["efficiency"].items()))
    n_runs = len(runs)
    m = len(per_metric["corrected_t"])
    result = {"runs": n_runs, "cells": int(sum(r["cells"] for r in runs)), "seconds": round(time.perf_counter() - t_start),
              "seeds": args.seeds, "folds": args.folds, "epoch_scale": args.epoch_scale, "detail": runs}
    print(f"\nReal A/A runs of experiments/ab_seeds.yaml: {n_runs} complete runs ({result['cells']} cells, "
          f"{args.seeds} seeds x {args.folds} folds x 2 arms each, epoch scale {args.epoch_scale}) in "
          f"{result['seconds']} s (budget {args.budget_s} s)")
    if n_runs:
        for test in ("corrected_t", "wilcoxon_old"):
            k = int(np.sum(per_metric[test]))
            lo, hi = wilson(k, m)
            fw = any_new if test == "corrected_t" else any_old
            result[test] = {"per_metric_fpr": k / m, "per_metric_ci": (lo, hi), "runs_with_a_false_verdict": fw}
            print(f"  {test:<12} per-metric raw p < {args.alpha}: {k} of {m} = {k / m:.3f} [{lo:.3f}, {hi:.3f}]; "
                  f"runs with any verdict after Holm: {fw} of {n_runs}")
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="mode", required=True)
    sim = sub.add_parser("simulate", help="simulated A/A and A/B experiments through the `ab analyze` path")
    sim.add_argument("--experiments", type=int, default=1000, help="experiments per condition (default 1000)")
    sim.add_argument("--seeds", type=int, default=5)
    sim.add_argument("--folds", type=int, default=5)
    sim.add_argument("--alpha", type=float, default=0.05)
    sim.add_argument("--effect-se", type=float, default=3.0, help="true effect in standard errors (default 3)")
    sim.add_argument("--seed", type=int, default=0)
    rl = sub.add_parser("real", help="real A/A runs of experiments/ab_seeds.yaml within a time budget")
    rl.add_argument("--budget-s", type=float, default=600.0, help="wall-clock budget (default 600 s)")
    rl.add_argument("--seeds", type=int, default=None, help="seeds per run (default: the YAML's, 5)")
    rl.add_argument("--folds", type=int, default=None, help="folds per run (default: the YAML's, 5)")
    rl.add_argument("--epoch-scale", type=float, default=None, help="default: the YAML's (0.2)")
    rl.add_argument("--alpha", type=float, default=0.05)
    rl.add_argument("--threads", type=int, default=1)
    rl.add_argument("--out", default=None, help="folder for the runs (default: a temporary folder)")
    rl.add_argument("--set", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                    help="TrainingConfig overrides for every run (e.g. data_root=...)")
    for p in (sim, rl):
        p.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    args = ap.parse_args(argv)
    result = simulate(args) if args.mode == "simulate" else real(args)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
