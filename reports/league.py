"""The quantized-merge league: every quantized artifact a run exported, as served, side by side — one row per
(configuration, format), whatever the method. A row's figures come from the export records
(harness/cell/exports.py), so a new method's INT-N export joins the table by saying its ``format``:

* accuracy as served, over the configuration's seeds, with a 95% bootstrap interval over test examples and seeds;
* the gap to the model as trained (the same run's unmerged accuracy): paired on the same examples, with its
  interval; the share of test predictions that differ; the largest logit difference;
* bits per weight on disk (every tensor of the served model counted, embeddings too);
* batch-1 latency of its fastest measured deployable form;
* the verdict against the best row: a difference whose interval includes 0 is "within noise", never a loss.
"""

from __future__ import annotations

import html
from dataclasses import dataclass

import numpy as np

from harness.records import RunRecord, headline_latency_s
from reports.claims import diff_interval
from reports.markdown import md_table
from reports.stats import answer_bits, boot_means


@dataclass
class Row:
    """One (configuration, format) over its seeds."""

    config: str  # method/variant
    kind: str  # the export's kind
    format: str
    seeds: int
    served: np.ndarray  # seeds × examples, 1 right / 0 wrong
    trained: np.ndarray
    bits: float | None
    flips: float | None
    logit_diff: float | None
    latency_s: tuple[str, float] | None  # (form, seconds per example at batch 1 / per token)


def _mean(xs: list) -> float | None:
    xs = [x for x in xs if x is not None]
    return float(np.mean(xs)) if xs else None


def rows(records: list[RunRecord]) -> list[Row]:
    """Every quantized export with per-example answers in every seed of its configuration."""
    groups: dict[tuple[str, str], list] = {}
    for r in records:
        if r.status != "ok" or not r.eval_after or not r.eval_after.correct:
            continue
        for e in r.exports:
            if e.format and e.eval and e.eval.correct and not e.error:
                groups.setdefault((f"{r.method}/{r.variant}", e.kind), []).append((r, e))
    out = []
    for (config, kind), pairs in sorted(groups.items()):
        pairs.sort(key=lambda p: p[0].seed)
        served = [answer_bits(e.eval.correct) for _, e in pairs]
        trained = [answer_bits(r.eval_after.correct) for r, _ in pairs]
        if len({len(x) for x in served + trained}) != 1:
            continue  # not the same test examples: no paired figure
        forms = [(d.name, headline_latency_s(d.latency)) for _, e in pairs for d in e.deployments if d.latency]
        by_form: dict[str, list[float]] = {}
        for name, s in forms:
            if s is not None:
                by_form.setdefault(name, []).append(s)
        fastest = min(((n, float(np.median(v))) for n, v in by_form.items()), key=lambda x: x[1], default=None)
        out.append(
            Row(
                config,
                kind,
                pairs[0][1].format,
                len(pairs),
                np.stack(served).astype(float),
                np.stack(trained).astype(float),
                _mean([e.bits_per_weight_on_disk for _, e in pairs]),
                _mean([e.predictions_differing for _, e in pairs]),
                max((e.max_abs_logit_diff for _, e in pairs if e.max_abs_logit_diff is not None), default=None),
                fastest,
            )
        )
    return out


def applies(records: list[RunRecord]) -> bool:
    """Worth a section: some run exported a quantized artifact with per-example answers."""
    return bool(rows(records))


def _interval(m: np.ndarray) -> tuple[float, float]:
    boot = boot_means([m])[:, 0]
    return float(np.quantile(boot, 0.025)), float(np.quantile(boot, 0.975))


def _pts(x: float) -> str:
    return f"{x * 100:+.1f}"


HEADER = [
    "configuration",
    "format",
    "seeds",
    "accuracy as served [95%]",
    "served − trained [95%]",
    "predictions differing",
    "max logit diff",
    "bits/weight on disk",
    "batch-1 latency",
    "vs the best",
]


def table(records: list[RunRecord]) -> tuple[list[str], list[list[str]]]:
    """Header and rows (text), best first."""
    league = sorted(rows(records), key=lambda r: -r.served.mean())
    header = HEADER
    body = []
    for i, row in enumerate(league):
        lo, hi = _interval(row.served)
        d, dlo, dhi = diff_interval(row.served, row.trained)
        gap = f"{_pts(d)} [{_pts(dlo)}, {_pts(dhi)}]" + (" (a loss)" if dhi < 0 else "")
        if i == 0:
            verdict = "best"
        elif row.served.shape == league[0].served.shape:
            b, blo, bhi = diff_interval(row.served, league[0].served)
            word = "below the best" if bhi < 0 else "within noise of the best"
            verdict = f"{word}: {_pts(b)} [{_pts(blo)}, {_pts(bhi)}]"
        else:
            verdict = "not comparable (other seeds)"
        lat = f"{row.latency_s[1] * 1e3:.2f} ms ({row.latency_s[0]})" if row.latency_s else "not measured"
        body.append(
            [
                row.config,
                f"{row.format} ({row.kind})",
                str(row.seeds),
                f"{row.served.mean():.3f} [{lo:.3f}, {hi:.3f}]",
                gap,
                "—" if row.flips is None else f"{row.flips * 100:.1f}%",
                "—" if row.logit_diff is None else f"{row.logit_diff:.3g}",
                "—" if row.bits is None else f"{row.bits:.2f}",
                lat,
                verdict,
            ]
        )
    return header, body


NOTE = (
    "Each quantized artifact as a user would serve it, reloaded from disk where ftbench has a loader. "
    "served − trained: the artifact's accuracy minus the same runs' unmerged model, paired on the same test "
    "examples (a QLoRA row's trained model is NF4 + adapter; QA-LoRA's and the merge-aware method's are "
    "INT-N + adapter). Intervals: bootstrap over test examples and seeds. bits/weight: the whole file over every "
    "parameter, embeddings and head included. A difference whose interval includes 0 is within noise."
)


def render(records: list[RunRecord]) -> str:
    """The report section: the table and how to read it."""
    header, body = table(records)
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    trs = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in body)
    return (
        f'<div class="scroll"><table class="sortable"><thead><tr>{head}</tr></thead><tbody>{trs}</tbody></table>'
        f'</div><p class="note">{html.escape(NOTE)}</p>'
    )


def to_markdown(records: list[RunRecord]) -> str:
    """The league for ``report --format md`` (and the README): empty where there is none."""
    if not applies(records):
        return ""
    header, body = table(records)
    return "\n".join(["### Quantized-merge league", "", *md_table(header, body), "", NOTE])
