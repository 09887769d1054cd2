"""The papers' claims, each with the paper's figure, ftbench's measured figure with its 95% interval and a
verdict: reproduced, not reproduced, or inconclusive (then: how many test examples would decide it).

Margins are fixed here, before any run, from what the papers themselves call parity; nothing is tuned to pass:

* "≈" (LoRA ≈ full, QLoRA ≈ LoRA, QA-LoRA merged = unmerged): the difference's 95% interval must lie inside
  ±1 accuracy point (the papers call differences of about a point parity: LoRA paper Table 2, RoBERTa-base GLUE
  average 87.2 LoRA vs 86.4 full; QLoRA paper Table 4, NF4 + DQ within a point of 16-bit LoRA on MMLU).
  Reproduced if inside; not reproduced if the interval lies wholly outside; otherwise inconclusive.
* "A beats B" / "A loses": the interval of the difference must exclude 0 in the claimed direction
  (not reproduced where it excludes 0 the other way, or, for a loss, excludes a loss of 1 point).
* Accounting claims (bits, bytes) are compared at the paper's own rounding.

Accuracy differences are paired: the same test examples, each example's correctness averaged over a
configuration's seeds; the interval is a bootstrap that resamples test examples and seeds together (2,000
draws, fixed generator seed), so it covers both sources of spread.
"""

from __future__ import annotations

import html
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from harness.records import EvalMetrics, RunRecord
from reports.metrics import fmt_pct
from reports.stats import answer_bits, boot_means

MARGIN = 0.01  # one accuracy point: what the papers call parity
TABLE1 = {4: "LLaMA-7B MMLU 5-shot: 39.4 vs 36.0", 2: "LLaMA-7B MMLU 5-shot: 27.5 vs 25.8"}  # QA-LoRA vs QLoRA+GPTQ


@dataclass
class Verdict:
    """One claim: its source, the paper's figure, ours, the verdict and why."""

    claim: str
    source: str
    paper: str
    measured: str
    verdict: str  # reproduced | not reproduced | inconclusive | not run
    why: str


def _bits(ev: EvalMetrics | None) -> np.ndarray | None:
    return answer_bits(ev.correct) if ev else None


def _matrix(evals: list[EvalMetrics | None]) -> np.ndarray | None:
    rows = [_bits(e) for e in evals]
    if not rows or any(r is None for r in rows) or len({len(r) for r in rows}) != 1:
        return None
    return np.stack(rows).astype(float)


def diff_interval(a: np.ndarray, b: np.ndarray, seed: int = 0) -> tuple[float, float, float]:
    """Mean accuracy of A minus B (seeds × examples each, the same examples), with a 95% bootstrap interval
    over examples and seeds (:func:`reports.stats.boot_means`)."""
    means = boot_means([a, b], seed)
    d = means[:, 0] - means[:, 1]
    return float(a.mean() - b.mean()), float(np.quantile(d, 0.025)), float(np.quantile(d, 0.975))


def _pts(x: float) -> str:
    return f"{x * 100:+.1f}"


def _needed(n: int, half: float, room: float, available: int) -> str:
    """Test examples that would shrink the interval's half-width to ``room`` (half-width ∝ 1/√n)."""
    if room <= 0:
        return "no number of examples would: the estimate sits on the margin"
    need = int(np.ceil(n * (half / room) ** 2))
    more = f" (the task's test split has {available}: more seeds or a larger task)" if need > available else ""
    return f"about {need:,} test examples at this spread would decide it{more}"


def equivalence(d: float, lo: float, hi: float, n: int, available: int) -> tuple[str, str]:
    """Reproduced when the interval lies inside ±1 accuracy point; else how many examples would decide."""
    ci = f"{_pts(d)} points [{_pts(lo)}, {_pts(hi)}]"
    if -MARGIN <= lo and hi <= MARGIN:
        return "reproduced", f"{ci}: inside ±1 point"
    if hi < -MARGIN or lo > MARGIN:
        return "not reproduced", f"{ci}: wholly outside ±1 point"
    half = (hi - lo) / 2
    room = MARGIN - abs(d) if abs(d) < MARGIN else abs(d) - MARGIN
    return "inconclusive", f"{ci}: straddles the ±1-point margin; " + _needed(n, half, room, available)


def direction(d: float, lo: float, hi: float, n: int, available: int, loss: bool = False) -> tuple[str, str]:
    """A beats B; with ``loss``, A loses against B. The interval must exclude 0 in the claimed direction; a loss
    is not reproduced where the interval excludes a loss of a point or more."""
    ci = f"{_pts(d)} points [{_pts(lo)}, {_pts(hi)}]"
    if not loss and lo > 0:
        return "reproduced", f"{ci}: excludes 0"
    if not loss and hi < 0:
        return "not reproduced", f"{ci}: excludes 0, the other way"
    if loss and hi < 0:
        return "reproduced", f"{ci}: a loss beyond noise"
    if loss and lo > -MARGIN:
        return "not reproduced", f"{ci}: excludes a loss of 1 point or more"
    claimed = d < 0 if loss else d > 0
    if d == 0:
        return "inconclusive", f"{ci}: no difference at all on these examples"
    if not claimed:
        return "inconclusive", f"{ci}: includes 0, and the estimate points the other way"
    return "inconclusive", f"{ci}: includes 0; " + _needed(n, (hi - lo) / 2, abs(d), available)


class Runs:
    """The claims suite's ok records by ``method/variant``."""

    def __init__(self, records: list[RunRecord]) -> None:
        self.by: dict[str, list[RunRecord]] = {}
        for r in records:
            if r.status == "ok" and r.eval_after:
                self.by.setdefault(f"{r.method}/{r.variant}", []).append(r)
        sizes = [((r.task_info or {}).get("split_sizes") or {}).get("test", 0) for r in records]
        self.available = max(sizes, default=0)  # this suite's test split

    def learned(self, key: str) -> bool:
        """Training's gain (after vs before, paired on the test examples) is beyond noise."""
        from reports.stats import gain

        runs = [r for r in self.by.get(key, []) if r.eval_before]
        return bool(runs) and gain(runs).significant and gain(runs).diff > 0

    def evals(self, key: str, export: str | None = None) -> np.ndarray | None:
        runs = sorted(self.by.get(key, []), key=lambda r: r.seed)
        if export is None:
            return _matrix([r.eval_after for r in runs]) if runs else None
        found = [next((e.eval for e in r.exports if e.kind == export), None) for r in runs]
        return _matrix(found) if runs else None


def _compare(runs: Runs, a: tuple, b: tuple, judge: Callable, **kw) -> tuple[str, str, str]:
    """(measured, verdict, why) for accuracy of A minus B; ``a``/``b``: (method/variant, export or None)."""
    ma, mb = runs.evals(*a), runs.evals(*b)
    if ma is None or mb is None or ma.shape[1] != mb.shape[1]:
        missing = [f"{k}{' ' + e if e else ''}" for (k, e), m in ((a, ma), (b, mb)) if m is None]
        return "—", "not run", f"no records with per-example answers for {', '.join(missing) or 'both'}"
    d, lo, hi = diff_interval(ma, mb)
    verdict, why = judge(d, lo, hi, ma.shape[1], runs.available or ma.shape[1], **kw)
    flat = [k for k in dict.fromkeys((a[0], b[0])) if not runs.learned(k)]
    if flat:  # a model that learned nothing makes any comparison with it say little
        why += f"; caution: {', '.join(flat)} gained nothing beyond noise from training"
    seeds = f"{ma.shape[0]} vs {mb.shape[0]} seeds, {ma.shape[1]} test examples"
    return f"{ma.mean():.3f} vs {mb.mean():.3f} ({seeds})", verdict, why


# The suites/claims.yaml entries each claim reads (method/variant), checked when the claims suite loads
# (reports/claim_sets.select): a renamed entry is an error naming it, never a claim left "not run".
FULL, LORA, QLORA_NF4, QLORA_FP4 = "full/ft", "lora/r8", "qlora/nf4-dq", "qlora/fp4-dq"


def qalora_entry(bits: int, group: int) -> str:
    """The claims suite's QA-LoRA entry at ``bits`` and ``group``."""
    return f"qalora/int{bits}-g{group}"


ENTRIES = (
    {FULL, LORA, QLORA_NF4, QLORA_FP4}
    | {qalora_entry(b, 32) for b in (4, 3, 2)}
    | {qalora_entry(b, 128) for b in (3, 2)}
)


def task_claims(records: list[RunRecord]) -> list[Verdict]:
    """The verdicts of the claims that read the claims suite's runs."""
    runs = Runs(records)
    out = []

    def add(claim, source, paper, a, b, judge, extra="", **kw):
        measured, verdict, why = _compare(runs, a, b, judge, **kw)
        out.append(Verdict(claim, source, paper, measured + extra, verdict, why))

    lora_pct = [r.trainable_pct for r in runs.by.get(LORA, []) if r.trainable_pct is not None]
    pct = f"; LoRA trains {fmt_pct(lora_pct[0])} of the parameters" if lora_pct else ""
    add(
        "LoRA ≈ full fine-tuning accuracy, at ~1–2% of the parameters trained",
        "Hu et al. 2021 (LoRA), Table 2",
        "RoBERTa-base GLUE avg: LoRA 87.2 vs full 86.4 (0.24% trainable)",
        (LORA, None),
        (FULL, None),
        equivalence,
        pct,
    )
    add(
        "QLoRA (NF4 + double quantization) ≈ 16-bit LoRA",
        "Dettmers et al. 2023 (QLoRA), Table 4",
        "LLaMA 7–65B MMLU: NF4 + DQ matches BF16 LoRA within ~1 point",
        (QLORA_NF4, None),
        (LORA, None),
        equivalence,
    )
    add(
        "NF4 beats FP4 on the task",
        "Dettmers et al. 2023, Figure 3 / Table 2",
        "zero-shot accuracy and perplexity: NF4 > FP4 at 4 bits",
        (QLORA_NF4, None),
        (QLORA_FP4, None),
        direction,
    )
    for bits in (4, 3, 2):
        qlora = QLORA_NF4
        add(
            f"QA-LoRA's merged INT{bits} model scores what the unmerged one scored",
            "Xu et al. 2024 (QA-LoRA), §3.3",
            "exact: the adapter folds into the zero points",
            (qalora_entry(bits, 32), "merged_int"),
            (qalora_entry(bits, 32), None),
            equivalence,
        )
        add(
            f"QLoRA merged and requantized to INT{bits} loses accuracy",
            "Xu et al. 2024, Table 1",
            "LLaMA-7B MMLU: QLoRA's INT-N route (merge, then GPTQ) scores below QLoRA itself",
            (qlora, f"merged_int{bits}"),
            (qlora, None),
            direction,
            loss=True,
        )
        add(
            f"QA-LoRA merged INT{bits} beats QLoRA merged and requantized to INT{bits}",
            "Xu et al. 2024, Table 1",
            TABLE1.get(bits, "(not in Table 1)"),
            (qalora_entry(bits, 32), "merged_int"),
            (qlora, f"merged_int{bits}"),
            direction,
        )
    out.append(_gap_grows(runs))
    for bits in (3, 2):
        add(
            f"Smaller groups help QA-LoRA at {bits} bits (group 32 beats 128)",
            "Xu et al. 2024, Table 6",
            "LLaMA-7B MMLU, smaller groups better at 2–3 bits",
            (qalora_entry(bits, 32), "merged_int"),
            (qalora_entry(bits, 128), "merged_int"),
            direction,
        )
    return out


def _gap_grows(runs: Runs) -> Verdict:
    """(QA-LoRA merged − QLoRA requantized) at INT2 minus the same gap at INT4, one bootstrap over all four."""
    claim = "The QA-LoRA vs QLoRA-requantized gap grows at lower bits (INT2 gap > INT4 gap)"
    source, paper = "Xu et al. 2024, Table 1 (as issue 15 states it)", "5-shot MMLU gaps there: INT4 +3.4, INT2 +1.7"
    m = [
        runs.evals(qalora_entry(4, 32), "merged_int"),
        runs.evals(QLORA_NF4, "merged_int4"),
        runs.evals(qalora_entry(2, 32), "merged_int"),
        runs.evals(QLORA_NF4, "merged_int2"),
    ]
    if any(x is None for x in m) or len({x.shape[1] for x in m}) != 1:
        return Verdict(claim, source, paper, "—", "not run", "the four configurations' records are missing")
    gap4, lo4, hi4 = diff_interval(m[0], m[1])
    gap2, lo2, hi2 = diff_interval(m[2], m[3])
    g = boot_means(m)
    draws = (g[:, 2] - g[:, 3]) - (g[:, 0] - g[:, 1])
    n = m[0].shape[1]
    d, lo, hi = gap2 - gap4, float(np.quantile(draws, 0.025)), float(np.quantile(draws, 0.975))
    verdict, why = direction(d, lo, hi, n, runs.available or n)
    measured = f"gap INT4 {_pts(gap4)} [{_pts(lo4)}, {_pts(hi4)}], INT2 {_pts(gap2)} [{_pts(lo2)}, {_pts(hi2)}] points"
    return Verdict(claim, source, paper, measured, verdict, "difference of the gaps " + why)


def render_html(verdicts: list[Verdict], title: str, notes: list[str]) -> str:
    """The claims page: every verdict with its evidence."""
    colour = {"reproduced": "#1a7f37", "not reproduced": "#b42318", "inconclusive": "#9a6700", "not run": "#57606a"}
    head = "".join(f"<th>{c}</th>" for c in ("claim", "source", "paper's figure", "measured here", "verdict", "why"))
    rows = "".join(
        "<tr>"
        + "".join(f"<td>{html.escape(x)}</td>" for x in (v.claim, v.source, v.paper, v.measured))
        + f'<td style="color:{colour[v.verdict]};font-weight:600">{html.escape(v.verdict)}</td>'
        + f"<td>{html.escape(v.why)}</td></tr>"
        for v in verdicts
    )
    css = (
        "body{font-family:system-ui,sans-serif;margin:2em;max-width:1400px}table{border-collapse:collapse}"
        "td,th{border:1px solid #d0d7de;padding:6px 8px;vertical-align:top;text-align:left}th{background:#f6f8fa}"
        ".scroll{overflow-x:auto}.note{color:#57606a}"
    )
    body = "".join(f'<p class="note">{html.escape(n)}</p>' for n in notes)
    return (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><meta name="viewport" '
        f'content="width=device-width, initial-scale=1"><title>{html.escape(title)}</title><style>{css}</style>'
        f'</head><body><h1>{html.escape(title)}</h1>{body}<div class="scroll"><table><thead><tr>{head}</tr>'
        f"</thead><tbody>{rows}</tbody></table></div></body></html>"
    )


def to_markdown(verdicts: list[Verdict]) -> str:
    """The verdict table as Markdown, every string escaped."""
    from reports.markdown import md_table

    header = ["claim", "paper", "measured here", "verdict", "why"]
    return "\n".join(md_table(header, [[v.claim, v.paper, v.measured, v.verdict, v.why] for v in verdicts]))


def _per_layer(rows: list[dict], a: str, b: str) -> tuple[float, int, int, float]:
    """Median error ratio a/b over layers, layers where a is lower, layer count, Wilcoxon signed-rank p."""
    from scipy.stats import wilcoxon

    ratio = np.array([r[a] / r[b] for r in rows])
    p = float(wilcoxon(np.log(ratio)).pvalue) if len(rows) > 1 else 1.0
    return float(np.median(ratio)), int((ratio < 1).sum()), len(rows), p


def measurement_claims(meas: dict | None) -> list[Verdict]:
    """The claims decided by measurement alone: quantization error per layer, double quantization's bits, and
    memory at scale from the estimator (harness/measure/estimate.py; within 10% of measured peaks,
    docs/estimator.md)."""
    from harness.measure.estimate import ARCHS, GB, Setup, estimate

    out = []
    src = "Dettmers et al. 2023 (QLoRA), §3"
    for model, rows in ((meas or {}).get("layers") or {}).items():
        note = " (weights from a 4-bit GGUF Q4_1 file: biased for any 4-bit format)" if "smollm2" in model else ""
        for other, paper in (("fp4", "NF4 error < FP4's at 4 bits"), ("int4", "NF4 error < INT4's at 4 bits")):
            med, wins, n, p = _per_layer(rows, "nf4", other)
            measured = (
                f"{model}{note}: NF4/{other.upper()} error ratio median {med:.3f}; NF4 lower in {wins}/{n} layers"
            )
            if p < 0.05 and med < 1:
                verdict, why = "reproduced", f"Wilcoxon signed-rank over layers p = {p:.2g}"
            elif p < 0.05:
                verdict, why = "not reproduced", f"{other.upper()} lower, Wilcoxon p = {p:.2g}"
            else:
                verdict, why = "inconclusive", f"Wilcoxon p = {p:.2g} over {n} layers"
            claim = f"Quantization error, per layer: NF4 < {other.upper()} (block 64, 4.5 bits each)"
            out.append(Verdict(claim, src, paper, measured, verdict, why))
    const = (meas or {}).get("constant_bits") or {}
    big = next((k for k in const if k.startswith("normal")), None)
    if big:
        bits = const[big]
        saving = bits["plain"] - bits["double_quant"]
        small = next(((k, v) for k, v in const.items() if k != big), None)
        extra = (
            f" on a {big.removeprefix('normal ')} normal matrix; {small[0]}: "
            f"{small[1]['plain'] - small[1]['double_quant']:.3f} (each tensor's 256-entry code book weighs more "
            "on small tensors)"
            if small
            else ""
        )
        measured = f"{bits['plain']:.3f} → {bits['double_quant']:.3f} bits/param, saving {saving:.4f}{extra}"
        ok = round(saving, 3) == 0.373
        why = "equal at the paper's 3 digits" if ok else "differs at the paper's 3 digits"
        verdict = "reproduced" if ok else "not reproduced"
        paper = "0.5 → 0.127 bits/param, saving 0.373 (blocks 64, then 256)"
        out.append(Verdict("Double quantization saves ≈ 0.373 bits/param", src, paper, measured, verdict, why))
    qlora65 = estimate(
        ARCHS["llama-65b"],
        Setup(method="qlora", r=64, grad_checkpointing=True, optimizer="paged_adamw_32bit", batch=1, seq_len=512),
    )["peak"]
    fits = qlora65 * 1.1 < 48 * GB
    out.append(
        Verdict(
            "QLoRA fine-tunes LLaMA-65B within 48 GB",
            "Dettmers et al. 2023, abstract",
            "< 48 GB (one GPU)",
            f"estimated peak {qlora65 / GB:.1f} GB (r 64, all linears, paged AdamW, checkpointing, 1 × 512)",
            "reproduced" if fits else "inconclusive",
            "an estimate, + 10% (its error on measured peaks) still < 48 GB" if fits else "within 10% of 48 GB",
        )
    )
    g = ARCHS["gpt3-175b"]
    lora = estimate(g, Setup(method="lora", r=4, targets=("q_proj", "v_proj")))["peak"] / GB
    full = estimate(g, Setup(method="full"))["peak"] / GB
    for what, paper_gb, est in (("LoRA (r 4, W_q and W_v)", 350, lora), ("full fine-tuning", 1200, full)):
        within = abs(est - paper_gb) <= 0.1 * est
        out.append(
            Verdict(
                f"GPT-3 175B training memory, {what}",
                "Hu et al. 2021 (LoRA), §4.2",
                f"{paper_gb:,} GB",
                f"estimated {est:,.0f} GB (bf16 weights and gradients, fp32 AdamW moments)",
                "reproduced" if within else "not reproduced",
                "the paper's figure is within the estimate's 10%"
                if within
                else f"{est / paper_gb:.2f}× the paper's: the paper does not state its recipe (1.2 TB ≈ 7 bytes "
                "per parameter; 16-bit weights and gradients with 32-bit Adam moments are 12)",
            )
        )
    return out
