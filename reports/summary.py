"""The summary table: one row per run, the figures a reader compares first."""

from __future__ import annotations

from collections.abc import Iterable

from harness.records import RunRecord
from reports.metrics import CATALOGUE, fmt_bytes, fmt_count, fmt_pct  # noqa: F401  (fmt_*: imported from here too)

NUMERIC = {"trainable", "trainable %", "weights", "peak memory", "peak RSS", "step time (median)", "tokens/s", "MFU"}
# What each column means (the HTML header's hover and the footnotes under the table).
MEANINGS = {  # the metric columns' meanings are the catalogue's (reports/metrics.py); these are the rest
    "optimizer": "the optimizer, and whether paged state really was paged",
    "dtype": "the training dtype as resolved (auto: what ran here), the method's compute dtype where it differs, "
    "and fp16's steps skipped by loss scaling",
    "fastest deployment": "the run's fastest deployable artifact at batch 1 among those that lose no accuracy "
    "beyond noise against the trained model: ms per generated token (decoders) or per example (encoders); every "
    "form in the report's Deployment section",
    "merged exports: accuracy (max Δlogit)": "accuracy of each exported model and its max |logit difference| "
    "(prompts: of a continuation's log-likelihood) vs the trained in-memory model on the test split, both in the "
    "run's dtype: under bf16 autocast rounding alone moves scores by ~0.1, so there an exact merge is 0 differing "
    "predictions rather than Δ ≈ 0 (docs/methods.md)",
    **{m.column: m.meaning for m in CATALOGUE if m.column},
    "accuracy before → after": "test accuracy before and after training, [95% Wilson interval over test examples]",
}
COLUMNS = [
    "method",
    "variant",
    "model",
    "task",
    "seed",
    "status",
    "trainable",
    "trainable %",
    "weights",
    "peak memory",
    "peak RSS",
    "optimizer",
    "dtype",
    "step time (median)",
    "tokens/s",
    "MFU",
    "accuracy before → after",
    "forgetting: LM loss before → after",
    "exports",
    "merged exports: accuracy (max Δlogit)",
]


def prompt_mode(r: RunRecord) -> bool:
    """Whether the run read its task through prompts (a decoder without a head)."""
    return (r.model_info or {}).get("mode") == "prompt"


def accuracy_label(r: RunRecord) -> str:
    """Before → after. A decoder's "before" is its zero-shot accuracy through the prompt (as the method
    prepared it: e.g. quantized); a classifier's is an untrained head's."""
    b, a = r.eval_before, r.eval_after
    if b is None:
        return "—"
    before = f"{b.accuracy:.3f}" + (" zero-shot" if prompt_mode(r) else "")
    if a is None:
        return f"{before} → —"
    lo, hi = wilson(a.accuracy, a.examples)
    return f"{before} → {a.accuracy:.3f} [{lo:.3f}, {hi:.3f}]"


def wilson(accuracy: float, n: int) -> tuple[float, float]:
    """The 95% Wilson interval of an accuracy over ``n`` examples."""
    from reports.stats import wilson as w  # statsmodels: only where an interval is drawn

    return w(accuracy, n)


def fmt_diff(x: float) -> str:
    """A max |Δlogit| without exponents in a table."""
    return "0" if x == 0 else ("< 0.0001" if x < 1e-4 else f"{x:.4f}")


def forgetting_label(r: RunRecord) -> str:
    """The LM loss on another task's text before → after, where measured."""
    f = r.forgetting or {}
    if "before" not in f:
        return "—"
    after = f"{f['after']['lm_loss']:.3f}" if "after" in f else "—"
    return f"{f['task']}: {f['before']['lm_loss']:.3f} → {after}"


def shown_columns(rows: list[dict[str, str]]) -> list[str]:
    """Columns worth a place: not the ones that are "—" in every row (e.g. forgetting when not measured)."""
    return [c for c in COLUMNS if not rows or any(row[c] != "—" for row in rows)]


def peak_memory_label(r: RunRecord) -> str:
    """CUDA allocator peak where there is one, else CPU live-tensor peak; always says which it is."""
    if r.training.cuda_max_allocated_bytes is not None:
        return f"{fmt_bytes(r.training.cuda_max_allocated_bytes)} (CUDA allocated)"
    if r.training.peak_live_tensor_bytes is not None:
        return f"{fmt_bytes(r.training.peak_live_tensor_bytes)} (CPU tensors)"
    return "—"


def optimizer_label(r: RunRecord) -> str:
    """The optimizer, and for paged ones whether paging really happened (it cannot on CPU)."""
    name = r.training.optimizer or (r.config.get("train", {}) or {}).get("optimizer") or "—"
    if r.training.paging_effective is False:
        return f"{name} (not paged: no CUDA)"
    return name


SHORT_DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}  # not hardware.py's: that imports torch


def train_dtype(r: RunRecord) -> str | None:
    """The dtype the run trained in, short ('bf16'), as resolved on its machine (`auto` as what it became);
    None where the record keeps none (or only `auto`, from before resolved dtypes were kept)."""
    d = (r.resolved_dtypes.get("train.dtype") or {}).get("value") or (r.config.get("train") or {}).get("dtype")
    return SHORT_DTYPES.get(d, d) if d and d != "auto" else None


def dtype_label(r: RunRecord) -> str:
    """'bf16', 'fp32 · compute bf16' (QLoRA dequantizing to bf16 under fp32 training), 'fp16 · 2 steps skipped'."""
    train = train_dtype(r)
    if train is None:
        return "—"
    compute = (r.resolved_dtypes.get("method.compute_dtype") or {}).get("value")
    parts = [train]
    if compute is not None and SHORT_DTYPES.get(compute, compute) != train:
        parts.append(f"compute {SHORT_DTYPES.get(compute, compute)}")
    if r.training.skipped_steps:
        n = len(r.training.skipped_steps)
        parts.append(f"{n} step{'s' if n > 1 else ''} skipped")
    return " · ".join(parts)


def mfu_label(r: RunRecord, loaded: str = "") -> str:
    """'12.3% of bf16 peak', with HFU where checkpointing recomputed the forward: '(HFU 16.4%)'."""
    if not r.mfu:
        return "—"
    hfu = f" (HFU {r.hfu * 100:.1f}%)" if r.hfu and abs(r.hfu - r.mfu) > 1e-12 else ""
    return f"{r.mfu * 100:.1f}% of {r.mfu_dtype or '?'} peak{hfu}{loaded}"


def fastest_deployment(r: RunRecord) -> str:
    """The run's fastest deployable form (harness/cell/deploy.py) and its latency at batch 1, among the forms
    that lose no accuracy beyond noise against the trained model (a lossy requantized merge is often fastest)."""
    from harness.records import headline_latency_s
    from reports.stats import form_vs_trained

    best = None
    for e in r.exports:
        for d in e.deployments:
            x = headline_latency_s(d.latency)
            versus = form_vs_trained(r, d)
            if versus is not None and versus.loses_beyond_noise:
                continue
            if x is not None and (best is None or x < best[0]):
                best = (x, f"{e.kind} {d.name}", d.latency["kind"] == "decoder")
    if best is None:
        return "—"
    return f"{best[1]} {best[0] * 1e3:.3g} ms/{'token' if best[2] else 'example'}"


def summary_rows(records: Iterable[RunRecord]) -> list[dict[str, str]]:
    """One row per run, each column as text: the summary's and the flat report's source."""
    from reports.stats import load_note

    rows = []
    for r in records:
        merged = [e for e in r.exports if e.max_abs_logit_diff is not None and e.eval is not None]
        loaded = f" {load_note(r)}" if load_note(r) else ""
        rows.append(
            {
                "method": r.method,
                "variant": r.variant,
                "model": r.model,
                "task": r.task,
                "seed": str(r.seed),
                "status": r.status if r.status == "ok" else f"{r.status}: {(r.error or '').splitlines()[0][:80]}",
                "trainable": fmt_count(r.trainable_params),
                "trainable %": fmt_pct(r.trainable_pct, ""),
                "weights": fmt_bytes(r.weight_bytes),
                "peak memory": peak_memory_label(r),
                "peak RSS": fmt_bytes(r.peak_rss_bytes),
                "optimizer": optimizer_label(r),
                "dtype": dtype_label(r),
                "step time (median)": f"{r.training.step_time_stats['median_s'] * 1000:.0f} ms{loaded}"
                if r.training.step_time_stats.get("median_s")
                else "—",
                "tokens/s": f"{r.training.tokens_per_s:,.0f}" if r.training.tokens_per_s else "—",
                "MFU": mfu_label(r, loaded),
                "accuracy before → after": accuracy_label(r),
                "forgetting: LM loss before → after": forgetting_label(r),
                "exports": "; ".join(f"{e.kind} {fmt_bytes(e.bytes_on_disk)}" for e in r.exports if not e.unsupported)
                or "—",
                "fastest deployment": fastest_deployment(r),
                "merged exports: accuracy (max Δlogit)": "; ".join(
                    [f"{e.kind} {e.eval.accuracy:.3f} ({fmt_diff(e.max_abs_logit_diff)})" for e in merged]
                    + [f"{e.kind}: {e.unsupported}" for e in r.exports if e.unsupported]
                )
                or "—",
            }
        )
    return rows


def to_markdown(records: Iterable[RunRecord]) -> str:
    """PR-ready: columns equal in every row stated once above the table, one row per run, HTML-special
    characters and pipes escaped (a variant named ``<b>`` stays text)."""
    from reports.markdown import md, md_table

    rows = summary_rows(records)
    once = ("model", "task", "seed", "status", "optimizer", "dtype")
    constant = [c for c in once if rows and len({r[c] for r in rows}) == 1]
    cols = [c for c in shown_columns(rows) if c not in constant]
    lines = [" · ".join(f"{c}: **{md(rows[0][c])}**" for c in constant), ""] if constant else []
    return "\n".join(lines + md_table(cols, [[row[c] for c in cols] for row in rows]))


def to_rich_table(records: Iterable[RunRecord], title: str = ""):
    """Terminal table; columns whose value is the same in every row (model, task, seed) move to the title."""
    from rich.markup import escape
    from rich.table import Table

    rows = summary_rows(records)
    constant = [c for c in ("model", "task", "seed") if rows and len({r[c] for r in rows}) == 1]
    shown = [c for c in shown_columns(rows) if c not in constant]
    extra = " · ".join(f"{c} {rows[0][c]}" for c in constant)
    table = Table(title=escape(" · ".join(x for x in (title, extra) if x)))
    for c in shown:
        table.add_column(c, overflow="fold")
    for row in rows:
        table.add_row(*(escape(row[c]) for c in shown))
    return table


def console():
    """A rich console that keeps tables whole in logs and pipes (rich assumes 80 columns when not a terminal)."""
    from rich.console import Console

    c = Console()
    return c if c.is_terminal else Console(width=220)
