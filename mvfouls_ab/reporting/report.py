"""One self-contained HTML report (plotly.js inlined: opens without network) for an A/B experiment or a study.

    python -m mvfouls_ab.report --experiment NAME [--storage URL] [--tracking-uri URI] [--out FILE]
    python -m mvfouls_ab.report --study NAME [--storage URL] [--tracking-uri URI] [--out FILE]
    (the command: cli/report.py; every figure: reporting/figures.py)

A/B experiment (cells stored by `python -m mvfouls_ab.ab`): the verdict table with a forest plot of B - A
(quality metrics; efficiency metrics apart), the leaderboard of the arms against the design's targets, per-class
recall per arm with 95% CIs, the arms' confusion matrices side by side (summed over cells, rows normalized),
learning curves, stability events on a timeline. `ab analyze` (cells from anywhere) writes the verdict part alone
(write_analysis_report).
HPO study (`python -m mvfouls_ab.study`): the trials' leaderboard against the targets, per-class recall of the best
trials, their confusion matrices, learning curves (reported values per epoch) and stability events, from what the
trials stored. The file is also logged to MLflow (the experiment's parent run, or the study's parent run).
"""
from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import StudyError, located
from ..evaluation.metrics import metric_name
from ..evaluation.targets import BY_NAME
from ..evaluation.targets import TARGETS as TARGET_LIST
from ..labels import CLASS_SLUGS, TASKS
from ..orchestration import ab as abtest
from ..orchestration import stats
from ..orchestration.storage import open_storage
from .figures import (
    TARGET_LINES,
    confusion_figure,
    curves_figure,
    events_figure,
    forest_figure,
    per_class_figure,
    targets_figure,
)

if TYPE_CHECKING:
    import optuna


TARGETS = TARGET_LINES      # the design's targets (evaluation/targets.py) under the metric names the report reads
BOARD = metric_name("val", "leaderboard")   # the leaderboard's key in the values the figures and target tables read
VERDICT_COLOURS = {stats.BETTER: "#c8f7c5", stats.WORSE: "#f7c5c5", stats.NO_DIFFERENCE: "#eeeeee"}


# ---- page ---------------------------------------------------------------------------------------------------
def render_page(title: str, intro: str, sections: Sequence[tuple[str, str, list[Any]]]) -> str:
    """HTML with plotly.js inlined once; sections are (heading, html text, plotly figures)."""
    from plotly.offline import get_plotlyjs

    body = []
    for heading, text, figures in sections:
        body.append(f"<section><h2>{html.escape(heading)}</h2>{text}")
        for fig in figures:
            body.append(fig.to_html(full_html=False, include_plotlyjs=False, config={"displaylogo": False}))
        body.append("</section>")
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1400px}} table.t{{border-collapse:collapse}}
table.t td,table.t th{{border:1px solid #ccc;padding:3px 8px;text-align:right}} .pass{{background:#c8f7c5}}
.fail{{background:#f7c5c5}} section{{margin-bottom:2.5em}} code{{background:#f4f4f4}}</style>
<script type="text/javascript">{get_plotlyjs()}</script></head>
<body><h1>{html.escape(title)}</h1><p><small>generated {stamp}</small></p>{intro}
{''.join(body)}</body></html>
"""


def html_table(frame, classes: Mapping[tuple[int, str], str] | None = None, floatfmt: str = "{:.3f}") -> str:
    """A small HTML table; classes[(row, column)] = css class of a cell."""
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in frame.columns)
    rows = []
    for i, (_, r) in enumerate(frame.iterrows()):
        cells = []
        for c in frame.columns:
            v = r[c]
            text = floatfmt.format(v) if isinstance(v, float) and math.isfinite(v) else str(v)
            css = (classes or {}).get((i, c))
            cells.append(f"<td{f' class={css!r}' if css else ''}>{html.escape(text)}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table class='t'><tr>{head}</tr>{''.join(rows)}</table>"


# ---- A/B experiment report ----------------------------------------------------------------------------------
def _fmt(value: float, spec: str = "+.3f") -> str:
    return format(value, spec) if isinstance(value, (int, float)) and math.isfinite(value) else \
        ("inf" if isinstance(value, float) and value == math.inf else "n/a")


def verdict_section(frame, primary: str | None, alpha: float = 0.05) -> tuple[str, str, list[Any]]:
    """('Verdicts', html, figures): the headline per arm on `primary`, the quality family's table and forest
    plot, then the efficiency metrics (their own Holm family) with theirs. Shared by both A/B reports."""
    if frame.empty:
        return "Verdicts", "<p>No paired cells yet.</p>", []
    quality = frame[frame.family == stats.QUALITY]
    efficiency = frame[frame.family == stats.EFFICIENCY]
    primary = primary if primary in set(frame.metric) else (quality.metric.iloc[0] if len(quality) else None)
    items = []
    for _, r in frame[frame.metric == primary].iterrows():
        items.append(f"<li><b>{html.escape(r.arm)}</b> vs {html.escape(r.control)}: {html.escape(r.verdict)} on "
                     f"{html.escape(r.metric)} ({_fmt(r['diff'])}, {100 * (1 - alpha):.0f}% CI [{_fmt(r.ci_low)}, "
                     f"{_fmt(r.ci_high)}], Holm p {_fmt(r.p_adjusted, '.3f')}, MDE {_fmt(r.mde, '.3f')}, "
                     f"after Holm {_fmt(r.mde_adjusted, '.3f')})</li>")
    r0 = frame.iloc[0]
    k = int(r0.folds)
    items.append(f"<li>Test: {html.escape(str(r0.test))}, k = {k} folds, n = {int(frame.n.max())} paired cells; "
                 f"SE = sd(B - A) * sqrt(1/n + 1/(k-1)), df = n - 1. The correction's floor: however many seeds, "
                 f"SE &ge; sd * {math.sqrt(1 / (k - 1)):.2f} with k = {k}; more folds lower it.</li>")
    columns = ["arm", "metric", "n", "mean_a", "mean_b", "diff", "ci_low", "ci_high", "se", "p_value", "p_adjusted",
               "mde", "mde_adjusted", "verdict"]

    def table(rows) -> str:
        rows = rows.reset_index(drop=True)
        css = {(i, "verdict"): {stats.BETTER: "pass", stats.WORSE: "fail"}.get(v, "")
               for i, v in enumerate(rows.verdict)}
        return html_table(rows[columns], css)

    text = f"<ul>{''.join(items)}</ul>"
    figures = []
    if len(quality):
        text += (f"<h3>Quality metrics</h3><p>Holm over the {int((quality.arm == quality.arm.iloc[0]).sum())} "
                 f"quality metrics of each comparison (family-wise error &le; {alpha}).</p>" + table(quality))
        figures.append(forest_figure(quality, f"B - A per quality metric ({100 * (1 - alpha):.0f}% CI; "
                                              "grey ticks: +-MDE)"))
    if len(efficiency):
        text += ("<h3>Efficiency metrics</h3><p>Lower is better; their own Holm family, never mixed with the "
                 "quality metrics. Wall time is as noisy as the machine the cells shared.</p>" + table(efficiency))
        figures.append(forest_figure(efficiency, "B - A per efficiency metric, in % of the control's mean "
                                                 "(lower is better)", relative=True))
    return "Verdicts", text, figures


def experiment_report_html(exp: abtest.Experiment, finished: Mapping[str, Any], counts: Mapping[str, int]) -> str:
    table = abtest.results_table(exp, finished)
    frame = abtest.verdict_frame(abtest.analyze(exp, table))
    summary = abtest.arm_summary(exp, table)
    arms = [a.name for a in exp.arms]
    by_arm: dict[str, list[Mapping[str, Any]]] = {a: [] for a in arms}
    for cell in finished.values():
        by_arm[cell["arm"]].append(cell)

    # the held-out scores under the names the shared figures read (val/...)
    values = {a: _group_values([_as_val(c.get("metrics") or {}) for c in by_arm[a]], [c["best"] for c in by_arm[a]])
              for a in arms}
    leaderboard = _target_table(values, "arm")
    matrices = {a: {t: sum((np.asarray(c["best"]["confusion_matrices"][t]) for c in by_arm[a]),
                           np.zeros((len(TASKS[t]),) * 2)) for t in TASKS} for a in arms}
    curves = {a: [c["curves"] for c in by_arm[a]] for a in arms}
    events = [dict(e, run=f"{c['arm']} s{c['seed']} f{c['fold']}") for a in arms for c in by_arm[a]
              for e in c.get("events") or []]

    complete = counts["finished"] == counts["cells"]
    arm_rows = "".join(f"<li><b>{html.escape(a.name)}</b>{' (control)' if a.name == exp.control else ''}: "
                       f"<code>{html.escape(str(a.overrides) or '{}')}</code>"
                       f"{' seed offset ' + str(a.seed_offset) if a.seed_offset else ''}"
                       f"{' - ' + html.escape(a.description) if a.description else ''}</li>" for a in exp.arms)
    intro = (f"<p>{html.escape(exp.description)}</p><ul>{arm_rows}</ul>"
             f"<p>Design: {len(arms)} arms x {exp.seeds} seeds x {exp.folds} stratified folds of Train+Valid "
             f"(Test untouched) = {counts['cells']} cells; <b>{counts['finished']} finished</b>"
             f"{'' if complete else ' (PARTIAL)'}. Each cell trains on its k - 1 training folds minus an inner "
             f"validation split (1/{abtest.INNER_FOLDS} of them, stratified), selects its epoch and post-hoc tau "
             f"there, and is scored on the held-out fold with what it would deploy. Every arm is compared with the "
             f"control <b>{html.escape(exp.control)}</b>: paired differences B - A per (seed, fold), the corrected "
             f"resampled t-test for repeated cross-validation (Nadeau &amp; Bengio; its CI and minimum detectable "
             f"effect from the same variance), Holm's correction over the {len(abtest.quality_metrics())} quality "
             f"metrics; wall time and peak memory per cell are a separate family.</p>")
    sections = [
        verdict_section(frame, abtest.PRIMARY_METRIC),
        ("Leaderboard against targets",
         "<p>Mean over cells of the held-out fold (deployed predictions); green = target met "
         "(macro recall > 0.45, macro F1 > 0.40, every class recall > 0.25, loss < 5: the held-out "
         "cross-entropy summed over both tasks).</p>" + leaderboard
         + html_table(summary.round(4)), [targets_figure(values, "Targets per arm (mean, 95% CI over cells)")]),
        ("Per-class recall per arm", "", [per_class_figure(values, "Per-class recall (mean, 95% CI over cells)")]),
        ("Confusion matrices", ("<p>Summed over the arm's cells (held-out fold, deployed predictions); colour = "
         "share of the true class.</p>"), [confusion_figure(matrices, "Confusion matrices per arm")]),
        ("Learning curves", ("<p>On each cell's inner validation split (what selects the epoch). Thin: one cell; "
                             "thick: mean of the arm.</p>"), [curves_figure(curves, "Learning curves per arm")]),
        ("Stability events", f"<p>{len(events)} events in {sum(map(len, by_arm.values()))} cells.</p>",
         [events_figure(events, "StabilityGuard events per cell")]),
    ]
    return render_page(f"A/B experiment {exp.name}", intro, sections)


def _as_val(metrics: Mapping[str, float]) -> dict[str, float]:
    prefix = f"{abtest.SCORED}/"
    return {("val/" + k[len(prefix):]) if k.startswith(prefix) else k: v for k, v in metrics.items()}


def analysis_report_html(frame, cells, source: str, alpha: float = 0.05) -> str:
    """The report of `ab analyze`: verdicts (as in the experiment report) and each arm's per-metric means."""
    import pandas as pd

    arms = list(dict.fromkeys(cells.arm))
    control = frame.control.iloc[0] if not frame.empty else (arms[0] if arms else "")
    means = cells.groupby(["metric", "arm"], sort=False).value.agg(["mean", "std", "count"]).reset_index()
    wide = means.pivot(index="metric", columns="arm", values="mean").reindex(
        index=list(dict.fromkeys(cells.metric)), columns=arms).reset_index()
    counts = cells.groupby("arm", sort=False).apply(lambda g: len(set(zip(g.seed, g.fold))), include_groups=False)
    intro = (f"<p>Cells from <code>{html.escape(source)}</code>: {len(arms)} arms "
             f"({', '.join(f'{html.escape(a)} ({int(counts.get(a, 0))} cells)' for a in arms)}), "
             f"{cells.seed.nunique()} seeds x {cells.fold.nunique()} folds, {cells.metric.nunique()} metrics. "
             f"Control: <b>{html.escape(str(control))}</b>. A metric whose name contains <code>loss</code> or ends "
             f"in <code>_s</code> / <code>_mb</code> is lower-is-better; <code>system/...</code> metrics are a "
             f"family of their own.</p>")
    sections = [verdict_section(frame, abtest.PRIMARY_METRIC, alpha),
                ("Arm means", "<p>Mean over each arm's cells.</p>" + html_table(pd.DataFrame(wide)), [])]
    return render_page(f"A/B analysis of {Path(source).name}", intro, sections)


def write_analysis_report(frame, cells, out: Path | str, source: str, alpha: float = 0.05) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(analysis_report_html(frame, cells, source, alpha), encoding="utf-8")
    return out


def _group_values(metrics: Sequence[Mapping[str, float]], bests: Sequence[Mapping[str, Any]]) -> dict[str, list]:
    """metric -> per-run values, plus the derived worst-class recall."""
    out: dict[str, list[float]] = {}
    for m in metrics:
        for k, v in m.items():
            out.setdefault(k, []).append(float(v) if v is not None else math.nan)
    out[metric_name("val", BY_NAME["worst_class_recall"].metric)] = [min(min(b.get(f"{t}_per_class_recall") or [math.nan]) for t in TASKS)
                                   for b in bests]
    return out


def _target_table(values: Mapping[str, Mapping[str, Sequence[float]]], label: str) -> str:
    import pandas as pd

    rows, css = [], {}
    for i, (name, v) in enumerate(values.items()):
        row = {label: name, "leaderboard": float(np.nanmean(v.get(BOARD) or [math.nan]))}
        for metric, (target, higher) in TARGETS.items():
            mean = float(np.nanmean(v.get(metric) or [math.nan]))
            row[metric.removeprefix("val/")] = mean
            ok = mean > target if higher else mean < target
            css[(i, metric.removeprefix("val/"))] = "pass" if ok else "fail"
        rows.append(row)
    return html_table(pd.DataFrame(rows), css)


def write_experiment_report(name: str, storage: str, out: Path | str, tracking_uri: str | None = None) -> Path:
    exp = abtest.stored_experiment(name, storage)
    store = abtest.CellStore(exp, storage)
    page = experiment_report_html(exp, store.finished(), store.counts())
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page, encoding="utf-8")
    if tracking_uri:
        runs = store.get_attr("mlflow_runs") or {}
        if runs.get("_parent") and runs.get("_tracking_uri") == tracking_uri:
            from ..tracking import make_client

            make_client(tracking_uri).log_artifact(runs["_parent"], str(out))
    return out


# ---- HPO study report ---------------------------------------------------------------------------------------
def study_report_html(study: optuna.Study, top: int = 5) -> str:
    """The study's best COMPLETE trials: their Valid summary (study.py's `summary` user attribute) against the
    targets, per-class recall, and -- from each trial's run folder when this machine has it (metrics.jsonl,
    events.jsonl) -- the best epoch's confusion matrices, learning curves and stability events; without the folder
    the learning curve is the values the trial reported to Optuna per epoch."""
    import pandas as pd
    from optuna.trial import TrialState

    trials = sorted(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)),
                    key=lambda t: -(t.value if t.value is not None else -math.inf))
    best = trials[:top]
    values, matrices, curves, events = {}, {}, {}, []
    for t in best:
        name = f"trial {t.number}"
        valid = (t.user_attrs.get("summary") or {}).get("valid") or {}
        v = {metric: [valid.get(key, math.nan)] for key, metric in ((t.name, metric_name("val", t.metric)) for t in TARGET_LIST)}
        v[BOARD] = [valid.get("leaderboard", math.nan)]
        for task in TASKS:
            for slug, r in zip(CLASS_SLUGS[task], valid.get(f"{task}_recall") or []):
                v[metric_name("val", task, "recall", slug)] = [math.nan if r is None else r]
        values[name] = v
        history, trial_events = _run_folder(t.user_attrs.get("run_dir"))
        if history:
            top_record = max(history, key=lambda r: (r.get("leaderboard", -1), -r.get("val_loss", 0)))
            matrices[name] = {task: np.asarray(top_record["confusion_matrices"][task]) for task in TASKS}
            curves[name] = [history[-1].get("learning_curves") or {}]
        else:
            curves[name] = [{"leaderboard": [t.intermediate_values[s] for s in sorted(t.intermediate_values)]}]
        events += [dict(e, run=name) for e in trial_events]
    board = pd.DataFrame([{"trial": t.number, "value": t.value,
                           **{k: t.params[k] for k in sorted(t.params)[:8]}} for t in trials[:25]])
    intro = (f"<p>Study <b>{html.escape(study.study_name)}</b>: {len(study.trials)} trials, {len(trials)} complete. "
             f"The {len(best)} best by objective value (official leaderboard value on Valid) are shown; target "
             f"columns come from the official scoring of each trial's Valid prediction file.</p>")
    sections = [("Leaderboard against targets", _target_table(values, "trial") + html_table(board),
                 [targets_figure(values, "Targets of the best trials")]),
                ("Per-class recall", "", [per_class_figure(values, "Per-class recall of the best trials")])]
    if matrices:
        sections.append(("Confusion matrices", "<p>Best epoch of each trial (Valid).</p>",
                         [confusion_figure(matrices, "Confusion matrices")]))
    sections.append(("Learning curves", "", [curves_figure(curves, "Learning curves")]))
    sections.append(("Stability events", f"<p>{len(events)} events.</p>", [events_figure(events, "StabilityGuard events")]))
    return render_page(f"Study {study.study_name}", intro, sections)


def _run_folder(run_dir: str | None) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(metrics.jsonl records, events.jsonl events) of a trainer run folder; empty when absent."""
    import json

    if not run_dir or not Path(run_dir).is_dir():
        return [], []
    read = lambda name: [json.loads(line) for line in (Path(run_dir) / name).read_text().splitlines()
                         if line.strip()] if (Path(run_dir) / name).is_file() else []
    return read("metrics.jsonl"), read("events.jsonl")


def write_study_report(name: str, storage: str, out: Path | str, tracking_uri: str | None = None) -> Path:
    import optuna

    try:
        study = optuna.load_study(study_name=name, storage=open_storage(storage))
    except KeyError:
        raise StudyError(located(storage, f"no study {name!r} in this storage",
                                 "pass the --study-name used with python -m mvfouls_ab.study")) from None
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(study_report_html(study), encoding="utf-8")
    parent = study.user_attrs.get("mlflow_parent_run_id")
    if tracking_uri and parent:
        from ..tracking import make_client

        make_client(tracking_uri).log_artifact(parent, str(out))
    return out
