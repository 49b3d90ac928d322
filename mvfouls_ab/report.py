"""One self-contained HTML report (plotly.js inlined: opens without network) for an A/B experiment or a study.

    python -m mvfouls_ab.report --experiment NAME [--storage URL] [--tracking-uri URI] [--out FILE]
    python -m mvfouls_ab.report --study NAME [--storage URL] [--tracking-uri URI] [--out FILE]

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

import argparse
import html
import math
import sys
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from . import abtest, stats
from .cli import HelpFormatter
from .errors import MVFoulsError, StudyError, located
from .labels import CLASS_SLUGS, TASKS
from .orchestration.storage import DEFAULT_STORAGE, open_storage
from .targets import BY_NAME, CLASS_RECALL_TARGET
from .targets import TARGETS as TARGET_LIST

# The design's targets (targets.TARGETS, the only copy) under the metric names the report reads:
# metric -> (threshold, higher is better).
TARGETS: dict[str, tuple[float, bool]] = {f"val/{t.metric}": (t.threshold, t.higher_is_better) for t in TARGET_LIST}
BOARD = "val/leaderboard"   # the leaderboard's key in the values the figures and target tables read
VERDICT_COLOURS = {stats.BETTER: "#c8f7c5", stats.WORSE: "#f7c5c5", stats.NO_DIFFERENCE: "#eeeeee"}
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")


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


# ---- figures (shared by both reports) -----------------------------------------------------------------------
def targets_figure(groups: Mapping[str, Mapping[str, Sequence[float]]], title: str):
    """Mean (95% CI) of each target metric per group (arm or trial), with the target as a dashed line."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    metrics = list(TARGETS)
    fig = make_subplots(rows=1, cols=len(metrics), subplot_titles=[m.removeprefix("val/") for m in metrics])
    for g, (name, values) in enumerate(groups.items()):
        for col, metric in enumerate(metrics, start=1):
            mean, low, high = stats.mean_ci(values.get(metric, []))
            fig.add_trace(go.Bar(x=[name], y=[mean], name=name, legendgroup=name, showlegend=col == 1,
                                 marker_color=PALETTE[g % len(PALETTE)],
                                 error_y={"type": "data", "symmetric": False,
                                              "array": [0 if math.isnan(high) else high - mean],
                                              "arrayminus": [0 if math.isnan(low) else mean - low]}), row=1, col=col)
    for col, metric in enumerate(metrics, start=1):
        fig.add_hline(y=TARGETS[metric][0], line_dash="dash", line_color="black", row=1, col=col)
    fig.update_layout(title=title, height=420, barmode="group", showlegend=True)
    return fig


def per_class_figure(groups: Mapping[str, Mapping[str, Sequence[float]]], title: str):
    """Per-class recall per group with 95% bootstrap CIs of the mean over cells; 25% target line."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=2, subplot_titles=list(TASKS), column_widths=[0.65, 0.35])
    for g, (name, values) in enumerate(groups.items()):
        for col, task in enumerate(TASKS, start=1):
            means, plus, minus = [], [], []
            for slug in CLASS_SLUGS[task]:
                mean, low, high = stats.mean_ci(values.get(f"val/{task}/recall/{slug}", []))
                means.append(mean)
                plus.append(0 if math.isnan(high) else high - mean)
                minus.append(0 if math.isnan(low) else mean - low)
            fig.add_trace(go.Bar(x=list(TASKS[task]), y=means, name=name, legendgroup=name, showlegend=col == 1,
                                 marker_color=PALETTE[g % len(PALETTE)],
                                 error_y={"type": "data", "symmetric": False, "array": plus, "arrayminus": minus}),
                          row=1, col=col)
    fig.add_hline(y=CLASS_RECALL_TARGET, line_dash="dash", line_color="black")
    fig.update_yaxes(range=[0, 1.05], title_text="recall")
    fig.update_layout(title=title, barmode="group", height=480)
    return fig


def confusion_figure(matrices: Mapping[str, Mapping[str, np.ndarray]], title: str):
    """Rows: tasks; columns: groups. Row-normalized (recall) colours, summed counts as text."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    names = list(matrices)
    fig = make_subplots(rows=2, cols=max(1, len(names)), vertical_spacing=0.14, horizontal_spacing=0.14,
                        subplot_titles=[f"{n}: {t}" for t in TASKS for n in names])
    for col, name in enumerate(names, start=1):
        for row, task in enumerate(TASKS, start=1):
            cm = np.asarray(matrices[name].get(task, np.zeros((len(TASKS[task]),) * 2)), dtype=float)
            norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
            labels = list(CLASS_SLUGS[task])
            fig.add_trace(go.Heatmap(z=norm, x=labels, y=labels, text=cm.astype(int), texttemplate="%{text}",
                                     zmin=0, zmax=1, colorscale="Blues", showscale=col == len(names) and row == 1,
                                     hovertemplate="true %{y}<br>pred %{x}<br>%{text} (%{z:.2f} of row)<extra></extra>"),
                          row=row, col=col)
            fig.update_yaxes(autorange="reversed", row=row, col=col)
    fig.update_layout(title=title, height=900, width=max(700, 420 * len(names)))
    return fig


def curves_figure(curves: Mapping[str, Sequence[Mapping[str, Sequence[float | None]]]], title: str):
    """Per group: thin line per run, thick mean line; leaderboard, val loss, train loss against the epoch."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    keys = ("leaderboard", "val_loss", "train_loss")
    fig = make_subplots(rows=1, cols=3, subplot_titles=("val leaderboard", "val loss", "train loss"))
    for g, (name, runs) in enumerate(curves.items()):
        colour = PALETTE[g % len(PALETTE)]
        for col, key in enumerate(keys, start=1):
            series = [np.array([np.nan if v is None else v for v in run.get(key, [])], float) for run in runs]
            series = [s for s in series if len(s)]
            if not series:
                continue
            for s in series:
                fig.add_trace(go.Scatter(x=np.arange(1, len(s) + 1), y=s, mode="lines", line={"width": 0.7,
                                         "color": colour}, opacity=0.35, legendgroup=name, showlegend=False,
                                         hoverinfo="skip"), row=1, col=col)
            width = max(len(s) for s in series)
            padded = np.full((len(series), width), np.nan)
            for i, s in enumerate(series):
                padded[i, :len(s)] = s
            with np.errstate(all="ignore"):
                mean = np.nanmean(padded, axis=0)
            fig.add_trace(go.Scatter(x=np.arange(1, width + 1), y=mean, mode="lines+markers", name=name,
                                     line={"width": 3, "color": colour}, legendgroup=name, showlegend=col == 1),
                          row=1, col=col)
    fig.update_xaxes(title_text="epoch")
    fig.update_layout(title=title, height=430)
    return fig


def events_figure(events: Sequence[Mapping[str, Any]], title: str):
    """Stability events: x = epoch, y = the run, one marker symbol per kind."""
    import plotly.graph_objects as go

    fig = go.Figure()
    kinds = sorted({e["kind"] for e in events})
    symbols = ("x", "diamond", "triangle-up", "square", "star", "circle", "cross", "hexagon")
    for i, kind in enumerate(kinds):
        rows = [e for e in events if e["kind"] == kind]
        fig.add_trace(go.Scatter(
            x=[e["epoch"] for e in rows], y=[e["run"] for e in rows], mode="markers", name=kind,
            marker={"symbol": symbols[i % len(symbols)], "size": 12},
            text=[html.escape(", ".join(f"{k}={v}" for k, v in (e.get("detail") or {}).items()))[:300] for e in rows],
            hovertemplate="%{y}<br>epoch %{x}<br>%{text}<extra>" + kind + "</extra>"))
    if not events:
        fig.add_annotation(text="no stability events: no loss spike, NaN, rollback, collapse or OOM in any run",
                           showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper")
    fig.update_xaxes(title_text="epoch")
    fig.update_layout(title=title, height=max(320, 24 * len({e["run"] for e in events}) + 160))
    return fig


def forest_figure(frame, title: str, relative: bool = False):
    """B - A with its CI per metric, one panel per treatment arm; colour = verdict; +-MDE as grey ticks.

    relative: in percent of the control's mean (metrics in different units on one axis: seconds and MiB)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    arms = list(dict.fromkeys(frame.arm))
    fig = make_subplots(rows=1, cols=max(1, len(arms)), shared_yaxes=True,
                        subplot_titles=[f"{a} - {frame.control.iloc[0]}" for a in arms] if arms else None)
    colours = {stats.BETTER: "green", stats.WORSE: "red", stats.NO_DIFFERENCE: "grey"}
    shown: set[str] = set()
    for col, arm in enumerate(arms, start=1):
        rows = frame[frame.arm == arm]
        scale = 100.0 / rows.mean_a.abs().replace(0, np.nan) if relative else _ones(rows)
        for verdict, colour in colours.items():
            keep = (rows.verdict == verdict).to_numpy()
            r, k = rows[keep], scale[keep]
            if r.empty:
                continue
            fig.add_trace(go.Scatter(
                x=r["diff"] * k, y=r.metric, mode="markers", name=verdict, legendgroup=verdict,
                showlegend=verdict not in shown, marker={"color": colour, "size": 9},
                error_x={"type": "data", "symmetric": False, "array": (r.ci_high - r["diff"]) * k,
                             "arrayminus": (r["diff"] - r.ci_low) * k},
                customdata=np.stack([r.p_value, r.p_adjusted, r.mde, r["diff"]], axis=1),
                hovertemplate="%{y}: %{customdata[3]:+.4g}<br>p %{customdata[0]:.3f}, Holm %{customdata[1]:.3f}"
                              "<br>MDE %{customdata[2]:.4g}<extra></extra>"), row=1, col=col)
            shown.add(verdict)
        finite = np.isfinite(rows.mde).to_numpy()
        if finite.any():
            for sign in (-1, 1):
                fig.add_trace(go.Scatter(x=sign * rows.mde[finite] * scale[finite], y=rows.metric[finite],
                                         mode="markers", showlegend=False,
                                         marker={"symbol": "line-ns-open", "color": "#aaaaaa", "size": 10},
                                         hoverinfo="skip"), row=1, col=col)
        fig.add_vline(x=0, line_color="black", row=1, col=col)
    fig.update_yaxes(autorange="reversed")
    if relative:
        fig.update_xaxes(title_text="% of the control's mean")
    fig.update_layout(title=title, height=220 + 28 * len(set(frame.metric)))
    return fig


def _ones(rows):
    """A series of ones aligned with `rows` (the absolute forest plot's scale)."""
    return rows.mean_a * 0 + 1.0


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
    out[f"val/{BY_NAME['worst_class_recall'].metric}"] = [min(min(b.get(f"{t}_per_class_recall") or [math.nan]) for t in TASKS)
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
            from .tracking import make_client

            make_client(tracking_uri).log_artifact(runs["_parent"], str(out))
    return out


# ---- HPO study report ---------------------------------------------------------------------------------------
def study_report_html(study: Any, top: int = 5) -> str:
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
        v = {metric: [valid.get(key, math.nan)] for key, metric in ((t.name, f"val/{t.metric}") for t in TARGET_LIST)}
        v[BOARD] = [valid.get("leaderboard", math.nan)]
        for task in TASKS:
            for slug, r in zip(CLASS_SLUGS[task], valid.get(f"{task}_recall") or []):
                v[f"val/{task}/recall/{slug}"] = [math.nan if r is None else r]
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
        from .tracking import make_client

        make_client(tracking_uri).log_artifact(parent, str(out))
    return out


# ---- CLI ----------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mvfouls_ab.report", description=__doc__.split("\n\n")[0],
                                 formatter_class=HelpFormatter)
    which = ap.add_mutually_exclusive_group(required=True)
    which.add_argument("--experiment", help="A/B experiment name (or its experiments/ab_NAME.yaml)")
    which.add_argument("--study", help="Optuna HPO study name")
    ap.add_argument("--storage", default=DEFAULT_STORAGE)
    ap.add_argument("--tracking-uri", default=None, help="log the report to MLflow (default sqlite:///mlflow.db)")
    ap.add_argument("--no-mlflow", action="store_true")
    ap.add_argument("--out", type=Path, default=None, help="HTML file (default runs/reports/NAME.html)")
    args = ap.parse_args(argv)
    from .tracking import DEFAULT_TRACKING_URI

    tracking = None if args.no_mlflow else (args.tracking_uri or DEFAULT_TRACKING_URI)
    try:
        if args.experiment:
            name = Path(args.experiment).stem.removeprefix("ab_") if args.experiment.endswith(".yaml") \
                else args.experiment
            path = write_experiment_report(args.experiment, args.storage,
                                           args.out or Path("runs") / "reports" / f"ab_{name}.html", tracking)
        else:
            path = write_study_report(args.study, args.storage,
                                      args.out or Path("runs") / "reports" / f"study_{args.study}.html", tracking)
    except MVFoulsError as exc:
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    print(f"report: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
