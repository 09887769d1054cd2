"""The top of a report: per (model, task), each configuration over its seeds with its spread, and the best one
per axis with its margin and whether that margin is beyond noise (reports/stats.py). Nothing is called best,
bolded or starred on a difference the data cannot tell from noise."""

from __future__ import annotations

import html
import statistics
from collections import defaultdict
from dataclasses import dataclass

from harness.records import RunRecord, measured_step_times_s
from reports import stats, tuning
from reports.metrics import BY_KEY, fmt_bytes, fmt_pct, peak_bytes, smallest_export, text
from reports.summary import train_dtype


@dataclass
class Config:
    """One (model, task, method, variant) over its seeds."""

    name: str
    runs: list[RunRecord]
    acc: stats.Summary

    def steps_s(self) -> list[float]:
        return [t for r in self.runs for t in measured_step_times_s(r)]

    def median_step_s(self) -> float | None:
        xs = self.steps_s()
        return statistics.median(xs) if xs else None

    def peaks(self) -> list[int]:
        return [p for p in (peak_bytes(r)[0] for r in self.runs) if p is not None]


def configs(records: list[RunRecord]) -> dict[tuple[str, str], dict[str, Config]]:
    """ok runs with a test result, by (model, task) and then by method/variant."""
    by: dict[tuple, dict[str, list[RunRecord]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        if r.status == "ok" and r.eval_after is not None:
            by[(r.model, r.task)][f"{r.method}/{r.variant}"].append(r)
    return {k: {n: Config(n, rs, stats.summarize(rs)) for n, rs in v.items()} for k, v in by.items()}


@dataclass
class Best:
    """The best configuration on one axis, its margin, and whether the margin is beyond noise."""

    axis: str
    name: str | None  # None: no configuration has the figure
    margin: str
    significant: bool | None  # None: exact quantity, no noise to test
    evidence: str


def _memory_check(a: Config, b: Config) -> tuple[bool, str]:
    """Peak memory of two configurations. Live-tensor bytes (and the CUDA allocator's peak) are deterministic
    for a given model and batch order, and configurations of one suite share their seeds' batch orders: where
    every shared seed puts A below B, that is the measurement, not noise. Otherwise: 2 × the seed standard error."""
    pa = {r.seed: peak_bytes(r)[0] for r in a.runs if peak_bytes(r)[0] is not None}
    pb = {r.seed: peak_bytes(r)[0] for r in b.runs if peak_bytes(r)[0] is not None}
    shared = sorted(set(pa) & set(pb))
    if shared and all(pa[s] < pb[s] for s in shared):
        return True, f"lower on each of {len(shared)} shared seed(s), same batches (a deterministic count)"
    xa, xb = list(pa.values()), list(pb.values())
    if len(xa) < 2 or len(xb) < 2:
        return False, "not lower on every shared seed, and 1 seed: seed-to-seed spread not measured"
    se = (statistics.variance(xa) / len(xa) + statistics.variance(xb) / len(xb)) ** 0.5
    diff = abs(statistics.fmean(xa) - statistics.fmean(xb))
    return diff > 2 * se, f"difference {fmt_bytes(diff)} vs 2 × seed standard error {fmt_bytes(2 * se)}"


def best_per_axis(cs: dict[str, Config]) -> list[Best]:
    """The best configuration per axis (accuracy, memory, step time, parameters, artifact size)."""
    out = []
    ranked = sorted(cs.values(), key=lambda c: -c.acc.mean)
    if len(ranked) > 1:
        a, b = ranked[0], ranked[1]
        p = stats.compare_all({c.name: c.acc for c in ranked})[(a.name, b.name)]
        out.append(Best("accuracy", a.name, f"{p.diff:+.3f} over {b.name}", p.significant, p.why))
    with_peak = sorted((c for c in cs.values() if c.peaks()), key=lambda c: statistics.fmean(c.peaks()))
    if len(with_peak) > 1:
        a, b = with_peak[0], with_peak[1]
        ma, mb = statistics.fmean(a.peaks()), statistics.fmean(b.peaks())
        sig, why = _memory_check(a, b)
        # a ratio under 1.1× reads as "1.00×" at two decimals: a share says how small a difference is
        size = f"{mb / ma:.2f}×" if mb >= 1.1 * ma else f"{(1 - ma / mb) * 100:.2g}% less"
        out.append(Best("peak memory", a.name, f"{fmt_bytes(mb - ma)} less than {b.name} ({size})", sig, why))
    timed = sorted((c for c in cs.values() if c.median_step_s()), key=lambda c: c.median_step_s())
    if len(timed) > 1:
        a, b = timed[0], timed[1]
        v = stats.step_time_verdict(a.runs, b.runs, *stats.run_to_run_sigma([c.runs for c in cs.values()]))
        sig, why = v.significant, v.why
        margin = f"{(b.median_step_s() - a.median_step_s()) * 1000:.0f} ms/step less than {b.name}"
        out.append(Best("step time", a.name, margin, sig, why))
    for axis, key in (("trainable parameters", "trainable_params"), ("smallest artifact", "smallest_export_bytes")):
        m = BY_KEY[key]  # exact counts: the configuration's first run says it (seeds share the model)
        have = sorted((c for c in cs.values() if m.get(c.runs[0])), key=lambda c: m.get(c.runs[0]))
        if len(have) > 1:
            a, b = have[0], have[1]
            fa, fb = m.get(a.runs[0]), m.get(b.runs[0])
            what = f" ({smallest_export(a.runs[0])[1]})" if key == "smallest_export_bytes" else ""
            if fa == fb:
                out.append(Best(axis, f"{a.name} and {b.name} tie", f"{text(m, fa)}{what}", None, "exact count"))
            else:
                margin = f"{text(m, fa)}{what} vs {text(m, fb)} ({b.name})"
                out.append(Best(axis, a.name, margin, None, "exact count, not a measurement"))
    return out


def _verdicts(cs: dict[str, Config]) -> dict[str, tuple[str, str]]:
    """Each configuration against the most accurate one: (verdict, the evidence behind it)."""
    ranked = sorted(cs.values(), key=lambda c: -c.acc.mean)
    pairs = stats.compare_all({c.name: c.acc for c in ranked})
    top = ranked[0].name
    out = {top: ("most accurate" if len(ranked) > 1 else "", "")}
    for c in ranked[1:]:
        p = pairs[(top, c.name)]
        pv = f" (p = {p.p:.2g})" if p.p is not None else " (not testable)"
        out[c.name] = (f"{'below' if p.significant else p.noise + ' of'} {top}{pv}", p.why)
    if len(ranked) > 1 and not pairs[(top, ranked[1].name)].significant:
        out[top] = (f"most accurate, within noise of {ranked[1].name}", pairs[(top, ranked[1].name)].why)
    return out


def _row(c: Config, verdict: tuple[str, str], bold: bool) -> str:
    r = c.runs[0]
    peaks = c.peaks()
    peak = "—"
    if peaks:
        sd = f" ± {fmt_bytes(statistics.stdev(peaks))}" if len(peaks) > 1 else ""
        peak = f"{fmt_bytes(statistics.fmean(peaks))}{sd} ({peak_bytes(r)[1]})"
    steps = c.steps_s()
    step = "—"
    if steps:
        q = statistics.quantiles(steps, n=4) if len(steps) > 1 else [steps[0]] * 3
        step = f"{q[1] * 1000:.0f} ms (IQR {q[0] * 1000:.0f}–{q[2] * 1000:.0f})"
        if any(map(stats.under_load, c.runs)):
            step += " ⚠ measured under load"
    exports = "; ".join(f"{e.kind} {fmt_bytes(e.bytes_on_disk)}" for e in r.exports if not e.unsupported) or "—"
    acc = html.escape(c.acc.label)
    g = stats.gain(c.runs)
    pv = f", p = {g.p:.2g}" if g.p is not None else ""
    gained = f"{g.diff:+.3f} ({g.verdict}{pv})"
    cells = [  # (text, right-aligned figures); the verdict beside the accuracy, in view without scrolling
        (html.escape(c.name), False),
        (f"<b>{acc}</b>" if bold else acc, True),
        (f'<span title="{html.escape(g.why)}">{html.escape(gained)}</span>', True),
        (f'<span title="{html.escape(verdict[1])}">{html.escape(verdict[0])}</span>', False),
        (fmt_pct(r.trainable_pct), True),
        (html.escape(peak), True),
        (html.escape(step), True),
        (html.escape(exports), False),
        (html.escape(tuning.label(r)), False),
    ]
    return "<tr>" + "".join(f'<td class="{"numw" if right else ""}">{x}</td>' for x, right in cells) + "</tr>"


HEAD = [
    ("configuration", "method/variant"),
    ("accuracy", "test accuracy: mean ± sample std over seeds, [95% interval over test examples]"),
    ("gain from training", "accuracy after − before on the same test examples, and whether it is beyond noise"),
    (
        "vs the most accurate",
        "paired test on the same test examples (McNemar exact for one seed each, else a paired bootstrap), "
        "Holm-adjusted within this model and task; with 2+ seeds each the difference must also exceed twice its "
        "seed standard error. Hover for the evidence. Bold only where beyond noise",
    ),
    ("trainable", "trainable parameters as % of all (quantized weights counted by their logical size)"),
    ("peak memory", "mean over seeds (± std): CUDA allocator peak or CPU live-tensor peak, as named"),
    ("step time", "median over every timed step of every seed (warm-up and memory-tracked steps excluded), IQR"),
    ("exports", "each artifact on disk"),
    ("hyperparameters", "tuned on the validation split (trials, objective, the chosen values) or hand-set"),
]


def render(records: list[RunRecord]) -> str:
    """The summary block and the per-configuration table, per (model, task)."""
    parts = []
    for (model, task), cs in configs(records).items():
        n = next(iter(cs.values())).acc.examples
        dtypes = ", ".join(sorted({d for c in cs.values() for r in c.runs if (d := train_dtype(r))}))
        small = html.escape(f"({n} test examples{', ' + dtypes if dtypes else ''})")
        parts.append(f"<h3>{html.escape(model)} · {html.escape(task)} <small>{small}</small></h3>")
        items = []
        for b in best_per_axis(cs):
            tag = {True: "beyond noise", False: "within noise", None: "exact"}[b.significant]
            items.append(
                f"<li><b>{html.escape(b.axis)}</b>: {html.escape(b.name or '—')}, {html.escape(b.margin)} — "
                f'<span class="{"sig" if b.significant is not False else "nosig"}">{tag}</span> '
                f'<span class="note">({html.escape(b.evidence)})</span></li>'
            )
        parts.append(f"<ul class='best'>{''.join(items)}</ul>" if items else "")
        verdicts = _verdicts(cs)
        ranked = sorted(cs.values(), key=lambda c: -c.acc.mean)
        bold_top = len(ranked) > 1 and verdicts[ranked[0].name][0] == "most accurate"
        head = "".join(f'<th title="{html.escape(t)}">{html.escape(h)}</th>' for h, t in HEAD)
        body = "".join(_row(c, verdicts[c.name], bold_top and i == 0) for i, c in enumerate(ranked))
        parts.append(f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>')
    foot = "".join(f"<li><b>{html.escape(h)}</b>: {html.escape(t)}</li>" for h, t in HEAD)
    return "".join(parts) + f'<ul class="note">{foot}</ul>'
