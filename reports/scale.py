"""The report's "Memory at scale" section: measured peaks against the estimate, and the crossover.

Shown where a results set holds one method at two or more model sizes with the estimate in its records (e.g.
suites/scale.yaml). The table gives, per method and size, the measured peak by category, the estimate for
exactly that config and its error; a cell that ran out of memory shows the estimate in its place, labelled.
The figure draws each method's peak against the parameter count: measured points solid, the estimate's line
dashed, out to 70B (real architectures' sizes at the suite's own setup), and QLoRA's and QA-LoRA's saving
over LoRA (the first adapter method on the float base) the same way.
"""

from __future__ import annotations

import html
from types import SimpleNamespace

import plotly.graph_objects as go

from harness.records import RunRecord
from reports.figures import SERIES_COLORS, _layout

GIB = 2**30
CATEGORIES = ("weights", "gradients", "optimizer_state", "activations")


def at_the_estimates_shape(r: RunRecord) -> bool:
    """Did the run train on the batches the estimate assumes, every row ``max_seq_len`` tokens long (the synthetic
    task)? Real text pads each batch to its longest row, often far shorter (MiniLM on Rotten Tomatoes: 8 of 128
    tokens a row): there the estimate is an upper bound, and its "error" would be the padding it never saw. An
    out-of-memory run measured nothing: its task decides, as it does for records older than their token counts."""
    if r.task_info.get("kind") == "language_modeling":  # random ids at exactly max_seq_len, no padding
        return True
    t, seq = r.training, (r.config.get("train") or {}).get("max_seq_len")
    if not (t and t.tokens_per_s and t.samples_per_s and seq):
        return False
    return t.tokens_per_s / t.samples_per_s >= 0.95 * seq


def _points(records: list[RunRecord]) -> dict[str, list[RunRecord]]:
    """Per method/variant, its runs that carry an estimate (ok or oom) at the estimate's own batch shape,
    smallest model first."""
    by: dict[str, list[RunRecord]] = {}
    for r in records:
        estimated = r.estimate and "peak_bytes" in r.estimate and r.total_params
        if r.status in ("ok", "oom") and estimated and at_the_estimates_shape(r):
            by.setdefault(f"{r.method}/{r.variant}".removesuffix("/default"), []).append(r)
    return {k: sorted(v, key=lambda r: r.total_params) for k, v in by.items()}


def applies(records: list[RunRecord]) -> bool:
    """Worth a section: some method measured at two model sizes or more."""
    return any(len({r.total_params for r in rs}) > 1 for rs in _points(records).values())


def _ladder():
    """Arch of the Llama-3 family from 1B to 70B (one vocabulary and block design, so the line shows size)."""
    from harness.cell.shapes import LLAMA3_LADDER, SHAPES
    from harness.measure.estimate import arch_from_config

    return [arch_from_config(SimpleNamespace(**SHAPES[n].config)) for n in LLAMA3_LADDER]


def _estimate_line(run: RunRecord) -> list[tuple[float, float]]:
    """(parameters, estimated peak GiB) along the ladder at this run's own setup."""
    from harness.measure.estimate import NotEstimated, Setup, estimate

    setup = Setup(**{**run.estimate["setup"], "method": run.method, "targets": _targets(run)})
    out = []
    for arch in _ladder():
        try:
            out.append((sum(arch.params().values()), estimate(arch, setup)["peak"] / GIB))
        except (NotEstimated, ValueError):
            continue
    return out


def _targets(run: RunRecord):
    t = run.estimate["setup"].get("targets")
    return tuple(t) if isinstance(t, list) else t


def _peak(r: RunRecord) -> float | None:
    return (
        (r.training.peak_live_tensor_bytes or r.training.cuda_max_allocated_bytes or 0) / GIB
        if r.status == "ok"
        else None
    )


def _series(fig: go.Figure, pts: list[tuple[float, float]], name: str, color: str, kind: str) -> None:
    """One trace: ``measured`` (solid line, markers), ``estimate`` (dashed line) or ``oom`` (crosses)."""
    style = {
        "measured": dict(mode="lines+markers", line=dict(color=color), marker=dict(size=9)),
        "estimate": dict(mode="lines", line=dict(color=color, dash="dash")),
        "oom": dict(mode="markers", marker=dict(color=color, symbol="x", size=11)),
    }[kind]
    label = {"oom": "oom: estimate"}.get(kind, kind)
    fig.add_scatter(x=[p for p, _ in pts], y=[g for _, g in pts], name=f"{html.escape(name)} {label}", **style)


def figure(records: list[RunRecord]) -> go.Figure:
    """Each method's peak against the parameter count: measured solid, oom cells' estimates as crosses, the
    estimate's line dashed out to 70B."""
    fig = go.Figure()
    for i, (name, runs) in enumerate(_points(records).items()):
        color = SERIES_COLORS[i % len(SERIES_COLORS)]
        _series(fig, [(r.total_params, _peak(r)) for r in runs if _peak(r) is not None], name, color, "measured")
        oom = [(r.total_params, r.estimate["peak_bytes"] / GIB) for r in runs if r.status == "oom"]
        if oom:
            _series(fig, oom, name, color, "oom")
        _series(fig, _estimate_line(runs[-1]), name, color, "estimate")
    fig.update_layout(
        **_layout("Peak memory against model size (measured solid, estimate dashed)", "parameters", "GiB")
    )
    fig.update_xaxes(type="log")
    fig.update_yaxes(type="log")
    return fig


def _base(runs: list[RunRecord]) -> str:
    """What a method's records say it trains on: ``quantized`` (its base's weights well under the float model's),
    ``adapters`` (a few trainable parameters on the float base: LoRA and its kin), or ``all``."""
    r = runs[-1]
    weights, trainable = r.estimate["by_category_bytes"]["weights"], r.estimate["trainable_params"]
    if weights < 0.5 * _full_weights(r):
        return "quantized"
    return "all" if trainable >= 0.9 * r.total_params else "adapters"


def savings_figure(records: list[RunRecord]) -> go.Figure:
    """Each quantized-base method's saving over the first adapter method on the float base (LoRA in the scale
    suite), as a share of that method's peak at the same size, measured and estimated."""
    pts = _points(records)
    fig = go.Figure()
    base = next((name for name, runs in pts.items() if _base(runs) == "adapters"), None)
    if base is None:
        return fig
    ref = {r.model: _peak(r) for r in pts[base]}
    ref_line = dict(_estimate_line(pts[base][-1]))
    for i, (name, runs) in enumerate(pts.items()):
        if _base(runs) != "quantized":
            continue
        color = SERIES_COLORS[i % len(SERIES_COLORS)]
        both = [r for r in runs if ref.get(r.model) and _peak(r)]
        _series(fig, [(r.total_params, 100 * (1 - _peak(r) / ref[r.model])) for r in both], name, color, "measured")
        line = [(p, 100 * (1 - g / ref_line[p])) for p, g in _estimate_line(runs[-1]) if p in ref_line]
        _series(fig, line, name, color, "estimate")
    title = f"Peak memory saved over {html.escape(base)} (same float base, unquantized) at the same size"
    fig.update_layout(**_layout(title, "parameters", f"% of {html.escape(base)}'s peak"))
    fig.update_xaxes(type="log")
    return fig


def _full_weights(r: RunRecord) -> float:
    return r.total_params * r.estimate["setup"]["weight_dtype_bytes"]


def table(records: list[RunRecord]) -> str:
    """Method × size: measured peak by category, estimated peak, error."""
    from harness.measure.plan import measured_by_category

    head = [
        "method",
        "model",
        "parameters",
        *(c.replace("_", " ") for c in CATEGORIES),
        "measured peak",
        "estimate",
        "error",
    ]
    rows = []
    for name, runs in _points(records).items():
        for r in runs:
            e = r.estimate["peak_bytes"] / GIB
            m = measured_by_category(r) if r.status == "ok" else None
            cats = [f"{m[c] / GIB:.2f}" if m else "—" for c in CATEGORIES]
            peak = _peak(r)
            measured = f"{peak:.2f}" if peak is not None else f"{r.status} (limit)"
            error = f"{round((e / peak - 1) * 100, 1) + 0.0:+.1f}%" if peak else "estimate in its place"
            cells = [
                name,
                r.model.rstrip("/").rsplit("/", 1)[-1],
                f"{r.total_params / 1e9:.2f}B",
                *cats,
                measured,
                f"{e:.2f}",
                error,
            ]
            rows.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
    return (
        '<div class="scroll"><table><thead><tr>' + "".join(f"<th>{html.escape(h)}</th>" for h in head)
        + "</tr></thead><tbody>" + "".join(rows) + "</tbody></table></div>"
    )  # fmt: skip


def render(records: list[RunRecord], figure_html) -> str:
    """The section's body: the table, both figures and what they assume."""
    if not applies(records):
        return '<p class="note">One model size only: the crossover needs a method at two sizes or more.</p>'
    random = any(r.model_info.get("weights") == "random" for r in records)
    return (
        table(records)
        + '<p class="note">GiB (2<sup>30</sup> bytes) of tracked tensors at the step\'s peak, by category; the '
        "estimate is <code>ftbench estimate</code>'s for exactly that run's config. A cell over the suite's memory "
        "limit is an oom record: the estimate stands in its place, labelled."
        + (" Random weights: memory and speed only." if random else "")
        + "</p>"
        + figure_html(figure(records), "fig-scale")
        + figure_html(savings_figure(records), "fig-scale-saving")
        + '<p class="note">Dashed: the estimate at the suite\'s own setup (weights, batch, sequence length, rank, '
        "targets) along the Llama-3 family's real architectures, 1B, 3B, 8B and 70B.</p>"
    )
