"""Plotly figures of a results set. Every user-supplied string is HTML-escaped before it reaches a figure."""

from __future__ import annotations

import html
import statistics
from collections import defaultdict

import plotly.graph_objects as go

from harness.records import RunRecord, measured_step_times_s
from reports import stats
from reports.metrics import peak_bytes  # noqa: F401  (its owner is the metric catalogue)

MIB = 2**20
COLORS = ["#636efa", "#ef553b", "#00cc96", "#ab63fa", "#ffa15a", "#19d3f3", "#ff6692", "#b6e880", "#ff97ff"]
# Okabe & Ito's colour-blind-safe palette (distinct under deuteranopia and protanopia), one fixed colour per
# memory category, in every report.
CATEGORY_COLORS = {
    "params_trainable": "#0072B2",
    "params_frozen": "#56B4E9",
    "params_quantized": "#009E73",
    "buffers": "#999999",
    "inputs": "#F0E442",
    "gradients": "#E69F00",
    "optimizer_state": "#D55E00",
    "activations": "#CC79A7",
    "temporaries": "#000000",
    "weights": "#0072B2",
    "optimizer state": "#D55E00",
    "rest of the peak": "#999999",
}
SERIES_COLORS = ["#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000"]


def run_label(r: RunRecord, records: list[RunRecord]) -> str:
    """A run's name in a figure: model and task too where the set has more than one (model, task), so runs of
    two tasks never share a bar or a point."""
    several = len({(x.model, x.task) for x in records}) > 1
    where = f"{_short(r.model)} · {r.task} · " if several else ""
    return html.escape(f"{where}{r.method}/{r.variant} s{r.seed}")


def _short(model: str) -> str:
    return model.rstrip("/").rsplit("/", 1)[-1]


def groups(records: list[RunRecord]) -> dict[tuple, list[RunRecord]]:
    """ok runs grouped by everything but the seed."""
    out: dict[tuple, list[RunRecord]] = defaultdict(list)
    for r in records:
        if r.status == "ok" and r.eval_after is not None:
            out[(r.model, r.task, r.method, r.variant)].append(r)
    return dict(out)


def _layout(title: str, x: str, y: str, **kw) -> dict:
    return dict(
        title=title,
        xaxis_title=x,
        yaxis_title=y,
        template="plotly_white",
        height=420,
        margin=dict(l=60, r=20, t=50, b=60),
        **kw,
    )


def pareto(records: list[RunRecord]) -> go.Figure:
    """Peak memory vs accuracy (mean over seeds), one series per (model, task) — accuracies of different tasks
    do not compare — each with its frontier: the runs no other run of that task beats on both."""
    series: dict[tuple, list] = defaultdict(list)
    for (model, task, method, variant), rs in groups(records).items():
        mem = [peak_bytes(r)[0] for r in rs if peak_bytes(r)[0] is not None]
        if not mem:
            continue
        acc = stats.summarize(rs)
        series[(model, task)].append((statistics.fmean(mem) / MIB, acc.mean, f"{method}/{variant}", acc))
    kind = peak_bytes(records[0])[1] if records else ""
    fig = go.Figure()
    several = len(series) > 1
    for k, ((model, task), pts) in enumerate(series.items()):
        colour = SERIES_COLORS[k % len(SERIES_COLORS)]
        name = html.escape(f"{model} · {task}" if several else "runs")
        fig.add_scatter(
            x=[p[0] for p in pts],
            y=[p[1] for p in pts],
            text=[html.escape(p[2]) for p in pts],
            mode="markers+text",
            textposition="top center",
            name=name,
            legendgroup=name,
            marker=dict(size=11, color=colour),
        )
        frontier, best = [], -1.0
        for p in sorted(pts, key=lambda p: (p[0], -p[1])):
            if p[1] > best:
                frontier.append(p)
                best = p[1]
        # A star only where the gain over the last starred (cheaper) point is beyond noise on the same test
        # examples; a frontier point within noise of a cheaper one is drawn open, its hover says so.
        stars, hover, last = [], [], None
        for p in frontier:
            c = stats.paired(p[3], last[3]) if last is not None else None
            starred = c is None or c.significant
            stars.append("star" if starred else "circle-open")
            hover.append(html.escape(p[2] if c is None else f"{p[2]}: {c.diff:+.3f} over {last[2]}, {c.verdict}"))
            last = p if starred else last
        fig.add_scatter(
            x=[p[0] for p in frontier],
            y=[p[1] for p in frontier],
            mode="lines+markers",
            name=(f"{name}: " if several else "")
            + "Pareto frontier (no run is both cheaper and better; ☆ = beyond noise)",
            legendgroup=name,
            hovertext=hover,
            hoverinfo="text+x+y",
            line=dict(dash="dash", color=colour, width=2),  # explicit: plotly would copy the clear marker colour
            marker=dict(symbol=stars, size=16, color="rgba(0,0,0,0)", line=dict(width=2, color=colour)),
        )
    fig.update_layout(
        **_layout(
            f"Peak memory vs accuracy ({kind}; lower-left is cheaper, up is better)",
            f"peak memory, MiB ({kind})",
            "test accuracy after training",
            legend=dict(orientation="h", yanchor="top", y=-0.2, x=0),
        )
    )
    fig.update_layout(height=460 + 24 * len(series), margin=dict(b=70 + 30 * len(series)))
    return fig


def memory_breakdown(records: list[RunRecord]) -> go.Figure:
    """Bytes by category at the step's peak (harness/measure/memory.py). Older records without the breakdown show
    weights, optimizer state and the unexplained rest of the peak."""
    ok = [r for r in records if r.status == "ok" and peak_bytes(r)[0] is not None]
    names = [run_label(r, ok) for r in ok]
    fig = go.Figure()
    if all(r.training.memory_at_peak_bytes for r in ok):
        # the categories as the records name them, in the colours' (the tracker's) order: read from the records,
        # not from harness/measure/memory.py, so that drawing a report never imports torch (1.5 s)
        order = list(CATEGORY_COLORS)
        stored = dict.fromkeys(c for r in ok for c in r.training.memory_at_peak_bytes)
        for c in sorted(stored, key=lambda c: order.index(c) if c in order else len(order)):
            ys = [r.training.memory_at_peak_bytes.get(c, 0) / MIB for r in ok]
            if any(ys):
                fig.add_bar(x=names, y=ys, name=c.replace("_", " "), marker_color=CATEGORY_COLORS.get(c, "#999999"))
    else:
        weights = [(r.weight_bytes or 0) / MIB for r in ok]
        opt = [(r.training.optimizer_state_bytes or 0) / MIB for r in ok]
        rest = [max(0.0, peak_bytes(r)[0] / MIB - w - o) for r, w, o in zip(ok, weights, opt, strict=True)]
        for name, ys in (("weights", weights), ("optimizer state", opt), ("rest of the peak", rest)):
            fig.add_bar(x=names, y=ys, name=name, marker_color=CATEGORY_COLORS[name])
    fig.update_layout(
        barmode="stack", **_layout("Where the peak memory goes (live tensor bytes at the step's peak)", "run", "MiB")
    )
    return fig


def throughput(records: list[RunRecord]) -> go.Figure:
    """Median step time per run with its interquartile range over the measured steps; tokens/s as the label."""
    ok = [r for r in records if r.status == "ok" and r.training.tokens_per_s and measured_step_times_s(r)]
    quart = []
    for r in ok:
        xs = measured_step_times_s(r)
        q = statistics.quantiles(xs, n=4) if len(xs) > 1 else [xs[0]] * 3
        quart.append([v * 1000 for v in q])
    fig = go.Figure()
    fig.add_bar(
        x=[run_label(r, ok) for r in ok],
        y=[q[1] for q in quart],
        name="ms/step",
        error_y=dict(
            type="data",
            symmetric=False,
            array=[q[2] - q[1] for q in quart],
            arrayminus=[q[1] - q[0] for q in quart],
            visible=True,
        ),
        hovertext=[f"{r.training.tokens_per_s:,.0f} tokens/s" for r in ok],
        marker_color=SERIES_COLORS[0],
    )
    fig.update_layout(
        **_layout(
            "Training step time: median over measured steps (warm-up excluded), bars to the interquartile range",
            "run",
            "ms per optimizer step",
        )
    )
    return fig


def _moving_average(xs: list[float], window: int) -> list[float]:
    out, acc = [], 0.0
    for i, x in enumerate(xs):
        acc += x - (xs[i - window] if i >= window else 0.0)
        out.append(acc / min(i + 1, window))
    return out


def loss_curves(records: list[RunRecord]) -> go.Figure:
    """Per-step losses of small batches are noisy: show a moving average, raw curves one click away, and the
    validation loss where it was measured."""
    fig = go.Figure()
    window = 10
    with_losses = [r for r in records if r.training.losses]
    for i, r in enumerate(with_losses):
        steps = list(range(1, len(r.training.losses) + 1))
        name = run_label(r, with_losses)
        fig.add_scatter(
            x=steps,
            y=_moving_average(r.training.losses, window),
            mode="lines",
            name=f"{name} (avg {window})",
            legendgroup=name,
            line=dict(color=COLORS[i % len(COLORS)]),
        )
        fig.add_scatter(
            x=steps,
            y=r.training.losses,
            mode="lines",
            name=f"{name} (raw)",
            legendgroup=name,
            visible="legendonly",
            line=dict(width=1, color=COLORS[i % len(COLORS)]),
            opacity=0.4,
        )
        if r.validation_curve:  # the validation split's loss, where the suite asked for it (eval_every)
            fig.add_scatter(
                x=[p["step"] for p in r.validation_curve],
                y=[p["loss"] for p in r.validation_curve],
                mode="lines+markers",
                name=f"{name} (validation)",
                legendgroup=name,
                line=dict(dash="dot", color=COLORS[i % len(COLORS)]),
                marker=dict(symbol="diamond", size=7),
            )
    fig.update_layout(
        **_layout(f"Training loss per optimizer step (moving average over {window} steps)", "step", "loss")
    )
    return fig


def seed_spread(records: list[RunRecord]) -> tuple[go.Figure, list[str]]:
    """Accuracy mean ± std over seeds with its 95% interval over test examples, and plain sentences on which
    differences are beyond noise (paired tests on the same examples, Holm-adjusted; reports/stats.py)."""
    from reports import stats

    grouped = groups(records)
    several = len({(m, t) for m, t, _, _ in grouped}) > 1
    rows, by_pair = [], defaultdict(dict)
    for (model, task, method, variant), rs in grouped.items():
        name = f"{_short(model)} · {task} · {method}/{variant}" if several else f"{method}/{variant}"
        summary = stats.summarize(rs)
        rows.append((name, summary))
        by_pair[(model, task)][name] = summary
    fig = go.Figure()  # dots, not bars: bars would anchor at 0 and hide differences of a point or two
    xs = [html.escape(n) for n, _ in rows]
    fig.add_scatter(
        x=xs,
        y=[s.mean for _, s in rows],
        mode="markers+text",
        name="mean ± std over seeds",
        error_y=dict(type="data", array=[s.std for _, s in rows], visible=True, thickness=3),
        marker=dict(size=12, color=SERIES_COLORS[0]),
        text=[f"n={s.seeds}" for _, s in rows],
        textposition="middle right",
    )
    fig.add_scatter(
        x=xs,
        y=[s.mean for _, s in rows],
        mode="markers",
        name="95% interval over test examples",
        error_y=dict(
            type="data",
            symmetric=False,
            array=[s.ci[1] - s.mean for _, s in rows],
            arrayminus=[s.mean - s.ci[0] for _, s in rows],
            visible=True,
            color=SERIES_COLORS[1],
            thickness=1,
            width=8,
        ),
        marker=dict(size=4, color=SERIES_COLORS[1]),
    )
    fig.update_layout(
        **_layout("Accuracy after training: mean ± std over seeds, and its 95% interval", "configuration", "accuracy")
    )
    notes = []
    if rows and all(s.seeds < 2 for _, s in rows):
        notes.append(
            "Each configuration ran with one seed: seed-to-seed noise is not measured, so a difference below is "
            "judged on the test examples only. Add seeds to the suite to judge it across seeds too."
        )
    for summaries in by_pair.values():
        for (a, b), c in stats.compare_all(summaries).items():
            notes.append(f"{a} vs {b}: difference {c.diff:+.3f} → {c.verdict} ({c.why}).")
    return fig, notes
