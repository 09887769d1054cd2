"""Plotly figures of a results set. Every user-supplied string is HTML-escaped before it reaches a figure."""

from __future__ import annotations

import html
import statistics
from collections import defaultdict

import plotly.graph_objects as go

from harness.records import RunRecord

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


def peak_bytes(r: RunRecord) -> tuple[int | None, str]:
    """The peak-memory figure a record has, and what it is (never call CPU memory VRAM)."""
    if r.cuda_max_allocated_bytes is not None:
        return r.cuda_max_allocated_bytes, "CUDA max allocated"
    return r.peak_live_tensor_bytes, "CPU live tensors"


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
        acc = [r.eval_after.accuracy for r in rs]
        series[(model, task)].append((statistics.fmean(mem) / MIB, statistics.fmean(acc), f"{method}/{variant}"))
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
        fig.add_scatter(
            x=[p[0] for p in frontier],
            y=[p[1] for p in frontier],
            mode="lines+markers",
            name=(f"{name}: " if several else "") + "Pareto frontier (no run is both cheaper and better)",
            legendgroup=name,
            line=dict(dash="dash", color=colour, width=2),  # explicit: plotly would copy the clear marker colour
            marker=dict(symbol="star", size=16, color="rgba(0,0,0,0)", line=dict(width=2, color=colour)),
        )
    fig.update_layout(
        **_layout(
            f"Peak memory vs accuracy ({kind}; lower-left is cheaper, up is better)",
            f"peak memory, MiB ({kind})",
            "test accuracy after training",
        )
    )
    return fig


def memory_breakdown(records: list[RunRecord]) -> go.Figure:
    """Bytes by category at the step's peak (harness/memory.py). Older records without the breakdown show
    weights, optimizer state and the unexplained rest of the peak."""
    from harness.memory import CATEGORIES

    ok = [r for r in records if r.status == "ok" and peak_bytes(r)[0] is not None]
    names = [run_label(r, ok) for r in ok]
    fig = go.Figure()
    if all(r.memory_at_peak_bytes for r in ok):
        for c in CATEGORIES:
            ys = [r.memory_at_peak_bytes.get(c, 0) / MIB for r in ok]
            if any(ys):
                fig.add_bar(x=names, y=ys, name=c.replace("_", " "), marker_color=CATEGORY_COLORS[c])
    else:
        weights = [(r.weight_bytes or 0) / MIB for r in ok]
        opt = [(r.optimizer_state_bytes or 0) / MIB for r in ok]
        rest = [max(0.0, peak_bytes(r)[0] / MIB - w - o) for r, w, o in zip(ok, weights, opt, strict=True)]
        for name, ys in (("weights", weights), ("optimizer state", opt), ("rest of the peak", rest)):
            fig.add_bar(x=names, y=ys, name=name, marker_color=CATEGORY_COLORS[name])
    fig.update_layout(
        barmode="stack", **_layout("Where the peak memory goes (live tensor bytes at the step's peak)", "run", "MiB")
    )
    return fig


def throughput(records: list[RunRecord]) -> go.Figure:
    ok = [r for r in records if r.status == "ok" and r.tokens_per_s]
    fig = go.Figure()
    fig.add_bar(
        x=[run_label(r, ok) for r in ok],
        y=[r.tokens_per_s for r in ok],
        name="tokens/s",
        text=[f"{r.step_time_stats.get('median_s', 0) * 1000:.0f} ms/step" for r in ok],
        textposition="auto",
    )
    fig.update_layout(**_layout("Training throughput (measured steps, warm-up excluded)", "run", "non-pad tokens / s"))
    return fig


def _moving_average(xs: list[float], window: int) -> list[float]:
    out, acc = [], 0.0
    for i, x in enumerate(xs):
        acc += x - (xs[i - window] if i >= window else 0.0)
        out.append(acc / min(i + 1, window))
    return out


def loss_curves(records: list[RunRecord]) -> go.Figure:
    """Per-step losses of small batches are noisy: show a moving average, raw curves one click away."""
    fig = go.Figure()
    window = 10
    with_losses = [r for r in records if r.losses]
    for i, r in enumerate(with_losses):
        steps = list(range(1, len(r.losses) + 1))
        name = run_label(r, with_losses)
        fig.add_scatter(
            x=steps,
            y=_moving_average(r.losses, window),
            mode="lines",
            name=f"{name} (avg {window})",
            legendgroup=name,
            line=dict(color=COLORS[i % len(COLORS)]),
        )
        fig.add_scatter(
            x=steps,
            y=r.losses,
            mode="lines",
            name=f"{name} (raw)",
            legendgroup=name,
            visible="legendonly",
            line=dict(width=1, color=COLORS[i % len(COLORS)]),
            opacity=0.4,
        )
    fig.update_layout(
        **_layout(f"Training loss per optimizer step (moving average over {window} steps)", "step", "loss")
    )
    return fig


def seed_spread(records: list[RunRecord]) -> tuple[go.Figure, list[str]]:
    """Accuracy mean ± std over seeds, and plain sentences on which differences are within noise."""
    stats = []
    grouped = groups(records)
    several = len({(m, t) for m, t, _, _ in grouped}) > 1
    for (model, task, method, variant), rs in grouped.items():
        acc = [r.eval_after.accuracy for r in rs]
        sd = statistics.stdev(acc) if len(acc) > 1 else 0.0
        name = f"{_short(model)} · {task} · {method}/{variant}" if several else f"{method}/{variant}"
        stats.append((name, statistics.fmean(acc), sd, len(acc), (model, task)))
    fig = go.Figure()  # dots, not bars: bars would anchor at 0 and hide differences of a point or two
    fig.add_scatter(
        x=[html.escape(s[0]) for s in stats],
        y=[s[1] for s in stats],
        mode="markers+text",
        error_y=dict(type="data", array=[s[2] for s in stats], visible=True),
        marker=dict(size=12),
        text=[f"n={s[3]}" for s in stats],
        textposition="middle right",
    )
    fig.update_layout(**_layout("Accuracy after training, mean ± std over seeds", "method/variant", "accuracy"))
    notes = []
    if stats and all(s[3] < 2 for s in stats):
        notes.append(
            "Each configuration ran with one seed, so no difference between them can be told apart from "
            "seed-to-seed noise. Add seeds to the suite to judge differences."
        )
        return fig, notes
    for i, a in enumerate(stats):
        for b in stats[i + 1 :]:
            if a[3] < 2 or b[3] < 2 or a[4] != b[4]:  # only runs of one model on one task compare
                continue
            se = (a[2] ** 2 / a[3] + b[2] ** 2 / b[3]) ** 0.5
            diff = a[1] - b[1]
            verdict = "within noise" if abs(diff) <= 2 * se else "larger than the noise"
            notes.append(f"{a[0]} vs {b[0]}: difference {diff:+.3f}, 2 × standard error {2 * se:.3f} → {verdict}.")
    return fig, notes
