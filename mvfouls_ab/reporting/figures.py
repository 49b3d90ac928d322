"""Every plotly figure of the project, once: what MLflow runs carry (built by the tracking thread from plain data,
FIGURES) and what the HTML reports show (reporting/report.py).

Confusion matrices are one kind of heatmap (:func:`confusion_trace`, rows = true class, colour = share of the
true class, text = counts) in three layouts: groups side by side (:func:`confusion_figure`: one run, or the arms of
an experiment, or the best trials of a study) and one run's epochs behind a slider (:func:`confusion_epochs_figure`).
Learning curves are one figure (:func:`curves_figure`): per group a thin line per run and a thick mean.
"""
from __future__ import annotations

import base64
import functools
import hashlib
import html
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

# plotly is imported here, in the importing (main) thread: the tracking thread builds figures, and two threads
# importing plotly's lazy dependencies (narwhals) at once can raise a _DeadlockError.
import plotly.graph_objects as go
import plotly.io as pio
from plotly.subplots import make_subplots

from ..evaluation.metrics import metric_name
from ..evaluation.targets import CLASS_RECALL_TARGET, TARGETS
from ..labels import CLASS_SLUGS, TASKS
from ..orchestration import stats

PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")
# the design's targets under the metric names the figures read: metric -> (threshold, higher is better)
TARGET_LINES: dict[str, tuple[float, bool]] = {metric_name("val", t.metric): (t.threshold, t.higher_is_better)
                                               for t in TARGETS}
# learning-curve panels: (title, key in a run's curves)
RUN_CURVES = (("val leaderboard", metric_name("val", "leaderboard")), ("val loss", metric_name("val", "loss")),
              ("train loss", metric_name("train", "loss")),
              ("action macro recall", metric_name("val", "action", "macro_recall")),
              ("severity macro recall", metric_name("val", "severity", "macro_recall")))
GROUP_CURVES = (("val leaderboard", "leaderboard"), ("val loss", "val_loss"), ("train loss", "train_loss"))


# ---- HTML ---------------------------------------------------------------------------------------------------
def figure_html(fig) -> str:
    """A plotly figure as a standalone HTML page, plotly.js from the CDN with its integrity hash, as
    ``include_plotlyjs="cdn"`` writes it (like mlflow.log_figure). That option re-reads and re-hashes the 4.6 MB
    plotly.js bundle for every figure (~25 ms); the script tag is made once per process here instead."""
    url, integrity = _plotly_cdn()
    html = pio.to_html(fig, include_plotlyjs=url, full_html=True)
    return html.replace(f'src="{url}"></script>', f'src="{url}" integrity="{integrity}" crossorigin="anonymous">'
                        "</script>", 1)


@functools.cache
def _plotly_cdn() -> tuple[str, str]:
    """(URL, SRI hash) of the plotly.js build that plotly's "cdn" option links: the same as its HTML."""
    from plotly.offline import get_plotlyjs, get_plotlyjs_version

    digest = hashlib.sha256(get_plotlyjs().encode("utf-8")).digest()
    return (f"https://cdn.plot.ly/plotly-{get_plotlyjs_version()}.min.js",
            "sha256-" + base64.b64encode(digest).decode("ascii"))




# ---- confusion matrices -------------------------------------------------------------------------------------
def _task_of(key: str, n: int) -> str | None:
    return next((task for task in TASKS if task in key and len(TASKS[task]) == n), None)


def confusion_trace(cm: Any, task: str | None, showscale: bool = False, visible: bool = True):
    """One confusion matrix as a heatmap: colour = share of the true class (row-normalized), text = counts."""
    cm = np.asarray(cm, dtype=float)
    names = list(CLASS_SLUGS[task]) if task else [str(i) for i in range(cm.shape[0])]
    norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    return go.Heatmap(z=norm, x=names, y=names, text=cm.astype(int), texttemplate="%{text}", zmin=0, zmax=1,
                      colorscale="Blues", showscale=showscale, visible=visible,
                      hovertemplate="true %{y}<br>pred %{x}<br>%{text} (%{z:.2f} of row)<extra></extra>")


def confusion_figure(groups: Mapping[str, Mapping[str, Any]], title: str):
    """Rows: tasks; columns: groups (one run, arms, trials), each {task: matrix}. Matrices summed by the caller."""
    names = list(groups)
    tasks = list(dict.fromkeys(t for g in groups.values() for t in g)) or list(TASKS)
    fig = make_subplots(rows=len(tasks), cols=max(1, len(names)), vertical_spacing=0.14, horizontal_spacing=0.14,
                        subplot_titles=[f"{n}: {t}" if len(names) > 1 else t for t in tasks for n in names])
    for col, name in enumerate(names, start=1):
        for row, key in enumerate(tasks, start=1):
            default = np.zeros((len(TASKS[key]),) * 2) if key in TASKS else np.zeros((1, 1))
            cm = np.asarray(groups[name].get(key, default))
            fig.add_trace(confusion_trace(cm, _task_of(key, cm.shape[0]), showscale=col == len(names) and row == 1),
                          row=row, col=col)
            fig.update_yaxes(autorange="reversed", title_text="true", row=row, col=col)
            fig.update_xaxes(title_text="predicted", row=row, col=col)
    fig.update_layout(title=title, height=450 * len(tasks), width=max(700, 420 * len(names)))
    return fig


def confusion_epochs_figure(epochs: Mapping[str, Any]):
    """One run's confusion matrices of every epoch ({step: (phase, {task: matrix})}), an epoch slider below."""
    steps = sorted(epochs, key=int)
    if not steps:
        return go.Figure()
    tasks = list(epochs[steps[0]][1])
    fig = make_subplots(rows=1, cols=len(tasks), subplot_titles=tasks, horizontal_spacing=0.15)
    for n, step in enumerate(steps):
        for col, key in enumerate(tasks, start=1):
            cm = np.asarray(epochs[step][1][key])
            fig.add_trace(confusion_trace(cm, _task_of(key, cm.shape[0]), visible=n == len(steps) - 1),
                          row=1, col=col)
    for col in range(1, len(tasks) + 1):
        fig.update_yaxes(autorange="reversed", title_text="true", row=1, col=col)
        fig.update_xaxes(title_text="predicted", row=1, col=col)
    k = len(tasks)
    slider = [{"label": f"{int(step) + 1} ({epochs[step][0]})", "method": "update",
               "args": [{"visible": [i // k == n for i in range(k * len(steps))]},
                        {"title": f"Confusion matrices, epoch {int(step) + 1} ({epochs[step][0]})"}]}
              for n, step in enumerate(steps)]
    fig.update_layout(title=f"Confusion matrices, epoch {int(steps[-1]) + 1} ({epochs[steps[-1]][0]})",
                      width=520 * k, height=600,
                      sliders=[{"active": len(steps) - 1, "currentvalue": {"prefix": "epoch "}, "steps": slider}])
    return fig


# ---- learning curves ----------------------------------------------------------------------------------------
def curves_figure(curves: Mapping[str, Sequence[Mapping[str, Sequence[float | None]]]], title: str,
                  panels: Sequence[tuple[str, str]] = GROUP_CURVES):
    """Per group: a thin line per run (when there are several) and a thick mean line, per panel (title, key)."""
    fig = make_subplots(rows=1, cols=len(panels), subplot_titles=[t for t, _ in panels])
    for g, (name, runs) in enumerate(curves.items()):
        colour = PALETTE[g % len(PALETTE)]
        for col, (_, key) in enumerate(panels, start=1):
            series = [np.array([np.nan if v is None else v for v in run.get(key, [])], float) for run in runs]
            series = [s for s in series if len(s) and not np.isnan(s).all()]
            if not series:
                continue
            for s in series if len(series) > 1 else ():
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
    fig.update_layout(title=title, height=430, width=max(900, 300 * len(panels)))
    return fig


def run_curves(history: Sequence[Mapping[str, float]]) -> dict[str, list[float | None]]:
    """One run's logged metric dicts (one per epoch) as curves {metric: values per epoch}."""
    keys = {key for _, key in RUN_CURVES}
    return {key: [h.get(key) for h in history] for key in keys}


# ---- class counts, targets, per-class recall, events, verdicts -----------------------------------------------
def class_distribution_figure(dist: Mapping[str, Mapping[str, list[int]]]):
    """Actions per class and split ({split: {task: counts}})."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=list(TASKS))
    for split, tasks in dist.items():
        for col, (task, names) in enumerate(TASKS.items(), start=1):
            fig.add_trace(go.Bar(x=list(names), y=tasks[task], name=f"{split} {task}"), row=1, col=col)
    fig.update_layout(title="Class distribution", barmode="group", width=1200, height=450)
    return fig


def targets_figure(groups: Mapping[str, Mapping[str, Sequence[float]]], title: str):
    """Mean (95% CI) of each target metric per group (arm or trial), with the target as a dashed line."""
    metrics = list(TARGET_LINES)
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
        fig.add_hline(y=TARGET_LINES[metric][0], line_dash="dash", line_color="black", row=1, col=col)
    fig.update_layout(title=title, height=420, barmode="group", showlegend=True)
    return fig


def per_class_figure(groups: Mapping[str, Mapping[str, Sequence[float]]], title: str):
    """Per-class recall per group with 95% bootstrap CIs of the mean over cells; 25% target line."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=list(TASKS), column_widths=[0.65, 0.35])
    for g, (name, values) in enumerate(groups.items()):
        for col, task in enumerate(TASKS, start=1):
            means, plus, minus = [], [], []
            for slug in CLASS_SLUGS[task]:
                mean, low, high = stats.mean_ci(values.get(metric_name("val", task, "recall", slug), []))
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


def events_figure(events: Sequence[Mapping[str, Any]], title: str):
    """Stability events: x = epoch, y = the run, one marker symbol per kind."""
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




FIGURES = {"confusion": lambda matrices, title: confusion_figure({"run": matrices}, title),
           "confusion_epochs": lambda epochs: confusion_epochs_figure(epochs),
           "learning_curves": lambda history, title="Learning curves": curves_figure(
               {"run": [run_curves(history)]}, title, RUN_CURVES),
           "class_distribution": lambda dist: class_distribution_figure(dist)}
