"""Compare two results sets cell by cell: absolute and relative deltas, and a warning where environments differ."""

from __future__ import annotations

from typing import Any

from harness.records import RunRecord
from reports.figures import peak_bytes

METRICS = {
    "accuracy_after": lambda r: r.eval_after.accuracy if r.eval_after else None,
    "macro_f1_after": lambda r: r.eval_after.macro_f1 if r.eval_after else None,
    "peak_bytes": lambda r: peak_bytes(r)[0],
    "weight_bytes": lambda r: r.weight_bytes,
    "step_time_median_s": lambda r: r.step_time_stats.get("median_s"),
    "tokens_per_s": lambda r: r.tokens_per_s,
    "trainable_params": lambda r: r.trainable_params,
    "export_bytes": lambda r: r.export_bytes,
}
ENV_KEYS = ("cpu_model", "cpu_isa", "native_bf16", "torch_threads", "cpu_count", "gpu", "python")
HARDWARE_KEYS = ("cpu_model", "cpu_isa", "native_bf16", "torch_threads", "gpu")


def hardware_of(r: RunRecord) -> str:
    """One record's hardware identity as one short string (older records may lack the newer fields)."""
    e = r.environment
    bf16 = {True: "native bf16", False: "bf16 not native"}.get(e.get("native_bf16"), "bf16 unknown")
    gpu = f"{e['gpu']} · " if e.get("gpu") else ""
    return (
        f"{gpu}{e.get('cpu_model')} · {e.get('cpu_isa') or 'ISA unknown'} · {bf16} · {e.get('torch_threads')} threads"
    )


def hardware_warning(old: list[RunRecord], new: list[RunRecord]) -> str | None:
    """Speed figures from different machines do not compare: say so, naming both."""
    a, b = sorted({hardware_of(r) for r in old}), sorted({hardware_of(r) for r in new})
    if a == b and len(a) <= 1:
        return None
    return (
        f"warning: records come from different hardware: OLD {' | '.join(a)}; NEW {' | '.join(b)} — "
        "step time, tokens/s and MFU are not comparable across them"
    )


def key(r: RunRecord) -> tuple:
    return (r.model, r.task, r.method, r.variant, r.seed)


def flat_rows(records: list[RunRecord]) -> list[dict[str, Any]]:
    """The summary as raw numbers (for CSV / JSON)."""
    rows = []
    for r in records:
        row = {
            "model": r.model,
            "task": r.task,
            "method": r.method,
            "variant": r.variant,
            "seed": r.seed,
            "status": r.status,
            "total_params": r.total_params,
            "trainable_pct": r.trainable_pct,
            "accuracy_before": r.eval_before.accuracy if r.eval_before else None,
            "peak_kind": peak_bytes(r)[1],
            "optimizer_state_bytes": r.optimizer_state_bytes,
            "paging_effective": r.paging_effective,
            "wall_time_s": r.wall_time_s,
        }
        row.update({k: f(r) for k, f in METRICS.items()})
        for e in r.exports:
            row[f"export_{e.kind}_bytes"] = e.bytes_on_disk
            if e.eval is not None:
                row[f"export_{e.kind}_accuracy"] = e.eval.accuracy
                row[f"export_{e.kind}_max_abs_logit_diff"] = e.max_abs_logit_diff
        rows.append(row)
    return rows


def env_differences(old: list[RunRecord], new: list[RunRecord]) -> list[str]:
    def summary(records: list[RunRecord]) -> dict[str, set]:
        out: dict[str, set] = {}
        for r in records:
            for k in ENV_KEYS:
                out.setdefault(k, set()).add(str(r.environment.get(k)))
            for lib, v in (r.environment.get("versions") or {}).items():
                out.setdefault(lib, set()).add(str(v))
        return out

    a, b = summary(old), summary(new)
    return [
        f"{k}: {sorted(a.get(k, set()))} → {sorted(b.get(k, set()))}"
        for k in sorted(set(a) | set(b))
        if a.get(k) != b.get(k)
    ]


def compare(old: list[RunRecord], new: list[RunRecord]) -> tuple[list[dict[str, Any]], list[str]]:
    """Rows of (cell, metric, old, new, delta, relative delta) for cells present in both sets."""
    old_by, new_by = {key(r): r for r in old}, {key(r): r for r in new}
    rows = []
    for k in [k for k in old_by if k in new_by]:
        o, n = old_by[k], new_by[k]
        for metric, f in METRICS.items():
            a, b = f(o), f(n)
            if a is None and b is None:
                continue
            delta = (b - a) if a is not None and b is not None else None
            rel = (delta / a) if delta is not None and a else None
            rows.append(
                {
                    "cell": f"{k[2]}/{k[3]} {k[0]} {k[1]} s{k[4]}",
                    "metric": metric,
                    "old": a,
                    "new": b,
                    "delta": delta,
                    "relative": rel,
                    "status": f"{o.status} → {n.status}",
                }
            )
    notes = env_differences(old, new)
    only_old = [k for k in old_by if k not in new_by]
    only_new = [k for k in new_by if k not in old_by]
    if only_old or only_new:
        notes.append(f"{len(only_old)} cells only in OLD, {len(only_new)} only in NEW (not compared)")
    return rows, notes


def fmt(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
