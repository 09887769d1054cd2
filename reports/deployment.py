"""What each final artifact costs at deployment: one row per (configuration, artifact, deployable form), over
seeds — bytes on disk, load time, latency at batch 1 (per generated token and prefill for decoders; per
example at batch 1 and 32 for encoders), the form's own test accuracy — and latency against accuracy."""

from __future__ import annotations

import html
import statistics
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import plotly.graph_objects as go

from harness.records import DeploymentRecord, RunRecord, headline_latency_s
from reports.figures import SERIES_COLORS, _layout
from reports.stats import answer_bits, answers_vs, wilson, wilson_over_seeds
from reports.summary import fmt_bytes, prompt_mode


@dataclass
class Form:
    """One deployable form of one configuration's artifact, over the configuration's seeds."""

    model: str
    task: str
    config: str
    artifact: str
    name: str
    dtype: str
    decoder: bool
    bytes_on_disk: list[int] = field(default_factory=list)
    runs: list[DeploymentRecord] = field(default_factory=list)
    trained: list[str | None] = field(default_factory=list)  # each run's trained answers (eval_after.correct)

    def _latencies(self, block: str) -> list[float]:
        return [d.latency[block]["median_s"] for d in self.runs if d.latency and block in d.latency]

    @property
    def latency_s(self) -> list[float]:
        """Each run's median headline latency: s per generated token (decoders), per example at batch 1."""
        return [x for d in self.runs if (x := headline_latency_s(d.latency)) is not None]

    @property
    def accuracy(self) -> list[float]:
        return [d.eval.accuracy for d in self.runs if d.eval]

    @property
    def skipped(self) -> str | None:
        return next((d.skipped or d.error for d in self.runs if d.skipped or d.error), None)


def forms(records: list[RunRecord]) -> dict[tuple[str, str], list[Form]]:
    """Every deployed form of every export, per (model, task)."""
    out: dict[tuple, Form] = {}
    for r in records:
        if r.status != "ok":
            continue
        for e in r.exports:
            for d in e.deployments:
                k = (r.model, r.task, f"{r.method}/{r.variant}", e.kind, d.name)
                decoder = prompt_mode(r)
                f = out.setdefault(k, Form(r.model, r.task, k[2], e.kind, d.name, d.dtype, decoder))
                f.bytes_on_disk.append(e.bytes_on_disk)
                f.runs.append(d)
                f.trained.append(r.eval_after.correct if r.eval_after else None)
    by: dict[tuple[str, str], list[Form]] = defaultdict(list)
    for f in out.values():
        by[(f.model, f.task)].append(f)
    return dict(by)


def _ms(xs: list[float]) -> str:
    if not xs:
        return "—"
    m = statistics.median(xs)
    scale, unit = (1, "s") if m >= 1 else (1e3, "ms") if m >= 1e-4 else (1e6, "µs")
    text = f"{m * scale:.3g} {unit}"
    if len(xs) > 1:
        text += f" ± {statistics.stdev(xs) * scale:.2g}"
    return text


def _within(f: Form, block: str) -> str:
    """The spread inside the runs: quartiles of the timed repeats (tokens, or forwards), pooled over seeds."""
    blocks = [d.latency[block] for d in f.runs if d.latency and block in d.latency]
    if not blocks:
        return ""
    lo, hi = min(b["q1_s"] for b in blocks) * 1e3, max(b["q3_s"] for b in blocks) * 1e3
    return f"IQR {lo:.3g}–{hi:.3g} ms"


def _accuracy(f: Form) -> str:
    acc = f.accuracy
    if not acc:
        return "—"
    n = next((d.eval.examples for d in f.runs if d.eval and d.eval.examples), None)
    mean = statistics.mean(acc)
    text = f"{mean:.3f}" + (f" ± {statistics.stdev(acc):.3f}" if len(acc) > 1 else "")
    bits = [d.eval.correct for d in f.runs if d.eval]
    if len(acc) > 1 and all(bits) and len({len(b) for b in bits}) == 1:  # the seeds' answers on the same examples
        per_example = np.mean([answer_bits(b) for b in bits], axis=0)
        lo, hi = wilson_over_seeds(per_example, len(acc))
        text += f" [{lo:.3f}, {hi:.3f}]"
    elif n and len(acc) == 1:
        lo, hi = wilson(mean, n)
        text += f" [{lo:.3f}, {hi:.3f}]"
    return text


def vs_trained(f: Form) -> str:
    """The form's answers against the trained model's, over the form's seeds (:func:`answers_vs`)."""
    served = [d.eval.correct if d.eval else None for d in f.runs]
    return answers_vs(f.trained, served)


COLUMNS = (
    "configuration",
    "artifact",
    "form",
    "on disk",
    "load",
    "latency",
    "prefill / batch 32",
    "test accuracy",
    "vs as trained",
)


def table_rows(fs: list[Form]) -> list[list[str]]:
    """The deployment table's rows for one (model, task)."""
    rows = []
    for f in sorted(fs, key=lambda f: (f.config, f.artifact, f.name)):
        if f.skipped and not f.latency_s:
            latency, second = f"not measured: {f.skipped}", ""
        elif f.decoder:
            latency = f"{_ms(f.latency_s)}/token ({_within(f, 'decode_per_token')})"
            second = f"prefill {_ms(f._latencies('prefill'))}"
        else:
            latency = f"{_ms(f.latency_s)}/example at batch 1"
            second = f"{_ms(f._latencies('batch_32_per_example'))}/example"
        loads = [d.load_time_s for d in f.runs if d.load_time_s is not None]
        load = _ms(loads) if loads else "— (in memory)"
        size = fmt_bytes(statistics.median(f.bytes_on_disk)) if f.bytes_on_disk else "—"
        rows.append(
            [f.config, f.artifact, f"{f.name} ({f.dtype})", size, load, latency, second, _accuracy(f), vs_trained(f)]
        )
    return rows


def figure(fs: list[Form]) -> go.Figure:
    """Latency at batch 1 against the form's test accuracy: each run a point, one series per configuration."""
    fig = go.Figure()
    configs, symbols = sorted({f.config for f in fs}), _symbols(fs)
    for f in fs:
        pts = [(headline_latency_s(d.latency), d.eval.accuracy) for d in f.runs if d.eval and d.latency]
        if not pts:
            continue
        i = configs.index(f.config)
        fig.add_scatter(
            x=[p[0] * 1e3 for p in pts],
            y=[p[1] for p in pts],
            mode="markers",
            name=html.escape(f"{f.config} · {f.artifact} · {f.name}"),
            marker=dict(size=10, color=SERIES_COLORS[i % len(SERIES_COLORS)], symbol=symbols[(f.artifact, f.name)]),
        )
    unit = "ms per generated token (batch 1)" if any(f.decoder for f in fs) else "ms per example (batch 1)"
    fig.update_layout(**_layout("Deployment: latency vs accuracy", unit, "test accuracy of the deployed form"))
    fig.update_xaxes(type="log")
    return fig


def _symbols(fs: list[Form]) -> dict[tuple[str, str], str]:
    """A marker per (artifact, form): the colour is the configuration's, so one configuration's forms (QLoRA's
    adapter in memory, on the fp32 base, its NF4 merge) must differ by shape. The common forms keep theirs."""
    fixed = {"fp32": "circle", "bf16": "diamond", "int4 kernel": "star"}
    pool = iter(["square", "triangle-up", "x", "triangle-down", "pentagon", "hexagon", "cross", "star-diamond"])
    return {key: fixed.get(key[1]) or next(pool, "square") for key in sorted({(f.artifact, f.name) for f in fs})}


def render(records: list[RunRecord], figure_html) -> str:
    """The report's "Deployment cost of each artifact" section as HTML."""
    by = forms(records)
    if not by:
        return (
            '<p class="note">No deployment figures: the runs exported nothing (<code>export: false</code>) or '
            "measured no deployable form (<code>deploy: {enabled: false}</code>, or records from before ftbench "
            "measured them).</p>"
        )
    parts = [
        '<p class="note">Each artifact as a user would deploy it: loaded from disk (timed), evaluated on the '
        "test split as deployed (its own dtype, no autocast), and timed at batch 1 after one warm-up: decoders "
        "prefill a prompt, then decode greedily one token at a time with the KV cache. Latency: the median "
        "over seeds of each run's median (± std over seeds), with the quartiles of the timed repeats. "
        "Inputs are seeded token ids; the thread count is the run's. Vs as trained: the right answers the form "
        "loses and gains against the trained model's (scored after training, in the run's dtype) on the same "
        "examples, McNemar exact for one seed, else a paired bootstrap.</p>"
    ]
    for k, ((model, task), fs) in enumerate(by.items()):
        parts.append(f"<h3>{html.escape(model)} · {html.escape(task)}</h3>")
        head = "".join(f"<th>{html.escape(c)}</th>" for c in COLUMNS)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in table_rows(fs))
        parts.append(f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>')
        parts.append(figure_html(figure(fs), f"fig-deploy-{k}"))
    return "".join(parts)


def to_markdown(records: list[RunRecord]) -> str:
    """One table per (model, task), its heading and every cell escaped like the summary's."""
    from reports.markdown import md, md_table

    lines = []
    for (model, task), fs in forms(records).items():
        lines += [f"**Deployment · {md(model)} · {md(task)}**", "", *md_table(COLUMNS, table_rows(fs)), ""]
    return "\n".join(lines)
