"""The metric catalogue: every per-run figure the reports compare, once — its key, the summary column it feeds,
its unit, how to read it from a record, which direction is better, and what it means. compare, the page's
two-metric explorer, the run table's numeric sort and the column meanings all read it (issue 28: the catalogue
was defined in each of them)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from harness.records import RunRecord


def peak_bytes(r: RunRecord) -> tuple[int | None, str]:
    """The peak-memory figure a record has, and what it is (never call CPU memory VRAM)."""
    if r.training.cuda_max_allocated_bytes is not None:
        return r.training.cuda_max_allocated_bytes, "CUDA max allocated"
    return r.training.peak_live_tensor_bytes, "CPU live tensors"


@dataclass(frozen=True)
class Metric:
    """One per-run figure: ``key`` (compare's rows, the page's JSON), ``column`` (the summary column it feeds, or
    ""), ``unit`` (bytes, s, tokens/s, params, %, proportion, fraction (shown in %), loss), ``get`` (None where
    the run lacks it), ``higher_is_better`` (None: neither), ``meaning`` (one line, for hovers and footnotes)."""

    key: str
    column: str
    unit: str
    get: Callable[[RunRecord], float | None]
    higher_is_better: bool | None
    meaning: str
    name: str = ""  # short, for an axis: the meaning's start where empty
    shown_as: tuple[str, float] | None = None  # the page's unit and scale, where not the unit's (SHOWN)


def fmt_bytes(n: float | None) -> str:
    """Bytes in binary units: ``457 MiB``."""
    if n is None or n != n:  # None or NaN
        return "—"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return "—"


def fmt_count(n: int | None) -> str:
    """A count in short form: ``22.7M``."""
    if n is None:
        return "—"
    return f"{n / 1e6:.2f}M" if n >= 1e6 else (f"{n / 1e3:.1f}k" if n >= 1e3 else str(n))


def fmt_pct(v: float | None, sign: str = "%") -> str:
    """A percentage to two decimals, or to two significant figures below 0.01% (prompt tuning's 8 virtual
    tokens on a 135M model train 0.0034%, which two decimals would show as 0.00%)."""
    if v is None:
        return "—"
    return f"{v:.2g}{sign}" if 0 < abs(v) < 0.01 else f"{v:.2f}{sign}"


_TEXT: dict[str, Callable[[float], str]] = {
    "bytes": fmt_bytes,
    "params": fmt_count,
    "s": lambda v: f"{v * 1000:.0f} ms",
    "tokens/s": lambda v: f"{v:,.0f}",
    "proportion": lambda v: f"{v:.3f}",
    "fraction": lambda v: f"{v * 100:.1f}%",
    "%": fmt_pct,
    "loss": lambda v: f"{v:.4f}",
}


def text(m: Metric, v: float | None) -> str:
    """``v``, a value of ``m``, as the reports write it (bytes in binary units, seconds in ms, counts short)."""
    return "—" if v is None else _TEXT.get(m.unit, str)(v)


def smallest_export(r: RunRecord) -> tuple[int | None, str]:
    """The smallest artifact a run exported (e.g. a LoRA adapter): bytes and kind."""
    made = [e for e in r.exports if not e.unsupported and e.bytes_on_disk]
    if not made:
        return None, ""
    e = min(made, key=lambda e: e.bytes_on_disk)
    return e.bytes_on_disk, e.kind


def _after(r: RunRecord, field: str) -> float | None:
    return getattr(r.eval_after, field) if r.eval_after else None


CATALOGUE: tuple[Metric, ...] = (
    Metric(
        "accuracy_after",
        "accuracy before → after",
        "proportion",
        lambda r: _after(r, "accuracy"),
        True,
        "test accuracy after training",
        name="test accuracy after training",
    ),
    Metric(
        "accuracy_before",
        "",
        "proportion",
        lambda r: r.eval_before.accuracy if r.eval_before else None,
        None,
        "test accuracy before training",
        name="test accuracy before training",
    ),
    Metric(
        "macro_f1_after",
        "",
        "proportion",
        lambda r: _after(r, "macro_f1"),
        True,
        "test macro-F1 after training",
        name="test macro-F1 after training",
    ),
    Metric(
        "peak_bytes",
        "peak memory",
        "bytes",
        lambda r: peak_bytes(r)[0],
        False,
        "CUDA allocator peak, or the peak of live CPU tensor bytes in a training step (never VRAM)",
        name="peak memory (as the run measured it)",
    ),
    Metric(
        "peak_rss_bytes",
        "peak RSS",
        "bytes",
        lambda r: r.peak_rss_bytes,
        False,
        "the cell process's peak resident set size (whole run: libraries, loading and evaluation too)",
        name="peak RSS of the cell process",
    ),
    Metric(
        "weight_bytes",
        "weights",
        "bytes",
        lambda r: r.weight_bytes,
        False,
        "bytes of parameter storage, packed 4-bit weights and their constants included",
        name="weight storage",
    ),
    Metric(
        "step_time_median_s",
        "step time (median)",
        "s",
        lambda r: r.training.step_time_stats.get("median_s"),
        False,
        "median time of an optimizer step over measured steps (warm-up excluded); ⚠ where other processes "
        "took more than half a core while the run trained",
        name="median step time",
    ),
    Metric(
        "tokens_per_s",
        "tokens/s",
        "tokens/s",
        lambda r: r.training.tokens_per_s,
        True,
        "non-pad training tokens per second over measured steps",
        name="training tokens per second",
    ),
    Metric(
        "trainable_params",
        "trainable",
        "params",
        lambda r: r.trainable_params,
        False,
        "parameters the optimizer updates",
        name="trainable parameters",
    ),
    Metric(
        "trainable_pct",
        "trainable %",
        "%",
        lambda r: r.trainable_pct,
        False,
        "trainable / all parameters, in % (quantized weights counted by their logical number)",
        name="trainable parameters, % of all",
    ),
    Metric(
        "export_bytes",
        "exports",
        "bytes",
        lambda r: r.export_bytes,
        False,
        "each artifact written, with its size on disk",
        name="all exports on disk",
    ),
    Metric(
        "smallest_export_bytes",
        "",
        "bytes",
        lambda r: smallest_export(r)[0],
        False,
        "the smallest artifact the run wrote (e.g. a LoRA adapter), on disk",
        name="smallest artifact",
    ),
    Metric(
        "mfu",
        "MFU",
        "fraction",
        lambda r: r.mfu,
        True,
        "model FLOP/s over measured steps / this machine's measured matmul peak in the named dtype",
        name="MFU, of the measured matmul peak",
    ),
    Metric(
        "forgetting_lm_loss_after",
        "forgetting: LM loss before → after",
        "loss",
        lambda r: (r.forgetting or {}).get("after", {}).get("lm_loss"),
        False,
        "LM loss on another task's held-out text, before and after training",
        name="LM loss on another task after training",
    ),
    Metric(
        "final_loss",
        "",
        "loss",
        lambda r: r.training.final_loss,
        False,
        "final training loss",
        name="final training loss",
    ),
    Metric(
        "wall_time_s",
        "",
        "s",
        lambda r: r.wall_time_s,
        None,
        "wall time of the run",
        name="wall time of the run",
        shown_as=("s", 1.0),
    ),
)
BY_KEY = {m.key: m for m in CATALOGUE}
BY_COLUMN = {m.column: m for m in CATALOGUE if m.column}

# How the page shows a unit (the explorer's axes): bytes in MiB, seconds in ms, fractions in %.
SHOWN = {"bytes": ("MiB", 1 / 2**20), "s": ("ms", 1e3), "fraction": ("%", 100.0)}


def _as(m: Metric) -> tuple[str, float]:
    return m.shown_as or SHOWN.get(m.unit, ("", 1.0))


def shown(m: Metric, r: RunRecord) -> float | None:
    """``m`` of ``r`` in the unit the page shows it in."""
    v, scale = m.get(r), _as(m)[1]
    return v if v is None or scale == 1.0 else v * scale


def shown_label(m: Metric) -> str:
    """``m``'s short name with the unit it is shown in."""
    unit = _as(m)[0]
    return f"{m.name}, {unit}" if unit else m.name
