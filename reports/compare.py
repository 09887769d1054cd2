"""Compare two results sets cell by cell: absolute and relative deltas, and a warning where environments differ."""

from __future__ import annotations

from typing import Any

from harness.records import RunRecord, headline_latency_s, measured_step_times_s
from reports import labels
from reports.metrics import BY_KEY, peak_bytes, text
from reports.stats import form_vs_trained, hardware_of

COMPARED = (  # the catalogue's metrics compare rows carry (reports/metrics.py)
    "accuracy_after",
    "macro_f1_after",
    "peak_bytes",
    "weight_bytes",
    "step_time_median_s",
    "tokens_per_s",
    "trainable_params",
    "export_bytes",
)
METRICS = {k: BY_KEY[k].get for k in COMPARED}
# the pivot's columns, each one of the catalogue's metrics
PIVOT = {
    "accuracy": "accuracy_after",
    "peak memory": "peak_bytes",
    "step time": "step_time_median_s",
    "tokens/s": "tokens_per_s",
    "trainable": "trainable_params",
    "exports": "export_bytes",
}
ENV_KEYS = (
    *("cpu_model", "cpu_family_model", "cpu_isa", "native_bf16", "torch_threads", "cpu_count", "gpu"),
    *("python", "git_commit"),
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
    """A run's identity across results dirs: model, task, method, variant, seed."""
    return (r.model, r.task, r.method, r.variant, r.seed)


def flat_rows(records: list[RunRecord]) -> list[dict[str, Any]]:
    """The summary as raw numbers (for CSV / JSON), with what a row means nothing without once rows from several
    suites or machines are pooled: the steps, learning rate and dtype it trained with, and the hardware."""
    rows = []
    for r in records:
        train = r.config.get("train") or {}
        dtype = (r.resolved_dtypes.get("train.dtype") or {}).get("value") or train.get("dtype")
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
            "optimizer_state_bytes": r.training.optimizer_state_bytes,
            "paging_effective": r.training.paging_effective,
            "wall_time_s": r.wall_time_s,
            "steps": train.get("steps"),
            "batch_size": train.get("batch_size"),
            "grad_accum": train.get("grad_accum"),
            "max_seq_len": train.get("max_seq_len"),
            **{f"{s}_inputs_cut": r.input_lengths[s].cut if s in r.input_lengths else None for s in ("train", "test")},
            "lr": train.get("lr"),
            "train_dtype": dtype,
            "steps_skipped_by_loss_scaling": len(r.training.skipped_steps) if r.training.loss_scales else None,
            "mfu": r.mfu,
            "hfu": r.hfu,
            "mfu_dtype": r.mfu_dtype,
            "hardware": hardware_of(r),
        }
        row.update({k: f(r) for k, f in METRICS.items()})
        if labels.applies([r]):  # classification: each label's recall, by the label's name
            names = r.task_info.get("labels") or []
            for k, (recall, _) in enumerate(labels.per_label(r)):
                row[f"recall_{names[k] if k < len(names) else k}"] = recall
        for e in r.exports:
            row[f"export_{e.kind}_bytes"] = e.bytes_on_disk
            if e.eval is not None:
                row[f"export_{e.kind}_accuracy"] = e.eval.accuracy
                row[f"export_{e.kind}_max_abs_logit_diff"] = e.max_abs_logit_diff
            for d in e.deployments:
                key = f"deploy_{e.kind}_{d.name.replace(' ', '_')}"
                row[f"{key}_load_time_s"] = d.load_time_s
                row[f"{key}_latency_s"] = headline_latency_s(d.latency)
                row[f"{key}_accuracy"] = d.eval.accuracy if d.eval else None
                versus = form_vs_trained(r, d)  # against the trained model, on the same examples
                row[f"{key}_answers_lost"] = versus.lost if versus else None
                row[f"{key}_answers_gained"] = versus.gained if versus else None
        rows.append(row)
    return rows


def env_differences(old: list[RunRecord], new: list[RunRecord]) -> list[str]:
    """Lines naming what differs between two sets' environments (versions, hardware, threads)."""

    def summary(records: list[RunRecord]) -> dict[str, set]:
        out: dict[str, set] = {}
        for r in records:
            for k in ENV_KEYS:
                out.setdefault(k, set()).add(str(r.environment.get(k)))
            for lib, v in (r.environment.get("versions") or {}).items():
                out.setdefault(lib, set()).add(str(v))
        return out

    a, b = summary(old), summary(new)
    for side in (a, b):
        side["git_commit"] = {c[:10] for c in side.get("git_commit", set())}
    return [
        f"{k}: {sorted(a.get(k, set()))} → {sorted(b.get(k, set()))}"
        for k in sorted(set(a) | set(b))
        if a.get(k) != b.get(k)
    ]


def effective(r: RunRecord) -> dict:
    """The config a run ran: the suite's, plus what each ``auto`` dtype became on its machine (the same suite is
    bf16 where this CPU runs it natively and float32 elsewhere, or under ``ATEN_CPU_CAPABILITY=avx2``)."""
    resolved = {k: v.get("value") for k, v in (r.resolved_dtypes or {}).items()}
    return {**r.config, "resolved_dtypes": resolved} if resolved else r.config


def config_diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Fields whose values differ between two resolved configs ("train.steps: 30 → 60")."""
    out = []
    for k in sorted(set(a) | set(b)):
        x, y = a.get(k), b.get(k)
        if isinstance(x, dict) and isinstance(y, dict):
            out += config_diff(x, y, f"{prefix}{k}.")
        elif x != y and k not in ("suite", "cell_id"):
            out.append(f"{prefix}{k}: {x} → {y}")
    return out


def compare(old: list[RunRecord], new: list[RunRecord]) -> tuple[list[dict[str, Any]], list[str]]:
    """Raw rows of (cell, metric, old, new, delta, relative, same config) for cells in both sets, and the
    warnings that change how they read."""
    old_by, new_by = {key(r): r for r in old}, {key(r): r for r in new}
    rows = []
    for k in [k for k in old_by if k in new_by]:
        o, n = old_by[k], new_by[k]
        same = not config_diff(effective(o), effective(n))
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
                    "same_config": same,
                }
            )
    return rows, warnings(old, new)


def warnings(old: list[RunRecord], new: list[RunRecord]) -> list[str]:
    """Everything that makes OLD and NEW differ besides the change being measured: config, code, machine."""
    out = []
    hw = hardware_warning(old, new)
    if hw:
        out.append(hw)
    out += [f"warning: environments differ: {d}" for d in env_differences(old, new)]
    old_by, new_by = {key(r): r for r in old}, {key(r): r for r in new}
    differ = {}
    for k in [k for k in old_by if k in new_by]:
        for d in config_diff(effective(old_by[k]), effective(new_by[k])):
            differ.setdefault(d, []).append(k)
    for d, ks in differ.items():
        out.append(f"warning: config differs in {len(ks)} cell(s), not judged: {d}")
    from reports.stats import under_load

    for side, rs in (("OLD", old), ("NEW", new)):
        loaded = sum(under_load(r) for r in rs)
        if loaded:
            out.append(
                f"warning: {loaded} {side} run(s) measured under load (other processes took CPU while they "
                "trained): their step time and tokens/s are not judged"
            )
        dirty = sum(bool(r.environment.get("git_dirty")) for r in rs)
        if dirty:
            out.append(f"warning: {dirty} {side} run(s) ran from a working tree with uncommitted changes")
    only_old = [k for k in old_by if k not in new_by]
    only_new = [k for k in new_by if k not in old_by]
    if only_old or only_new:
        out.append(f"note: {len(only_old)} cells only in OLD, {len(only_new)} only in NEW (not compared)")
    apart = drift_note(old, new) if hw is None else None
    if apart:
        out.append(apart)
    return out


def drift_note(old: list[RunRecord], new: list[RunRecord]) -> str | None:
    """Step time is judged against the spread between seeds within each side. Where OLD ran wholly before NEW (or
    after), a drift of the machine between the two is not in that spread: say how far apart they ran."""
    from datetime import datetime

    def span(rs: list[RunRecord]) -> tuple[datetime, datetime] | None:
        times = sorted(datetime.fromisoformat(r.started_at) for r in rs if r.status == "ok" and r.started_at)
        return (times[0], times[-1]) if times else None

    a, b = span(old), span(new)
    if a is None or b is None or (a[0] <= b[1] and b[0] <= a[1]):  # interleaved: drift is in both sides alike
        return None
    after = a[1] < b[0]
    gap = (b[0] - a[1]) if after else (a[0] - b[1])
    minutes = gap.total_seconds() / 60
    when = f"{minutes:.0f} min" if minutes < 120 else f"{minutes / 60:.0f} h" if minutes < 2880 else f"{gap.days} days"
    return (
        f"note: NEW ran {when} {'after' if after else 'before'} OLD: step-time verdicts use the seeds' spread within "
        "each, which leaves out this machine's drift between them (for a timing claim, alternate them: ABBA)"
    )


# The pivoted table: one row per cell, one column per metric, "old → new (change, verdict)"; a change is
# called better or worse only where it is beyond noise (reports/stats.py), on the same config and machine:
# accuracy by McNemar on the same test examples, step time against the run-to-run spread of the seeds.
HIGHER_IS_BETTER = {name: BY_KEY[key].higher_is_better for name, key in PIVOT.items()}


def _judge(metric: str, o: RunRecord, n: RunRecord, comparable: bool, same_hw: bool, noise: tuple) -> str:
    from reports import stats

    if not comparable:
        return "config differs: not judged"
    if metric == "accuracy":
        c = stats.paired(stats.summarize([n]), stats.summarize([o]))
        if c.p is None:
            return "not testable"
        same_test = (o.task_info.get("examples_sha256") or {}).get("test") == (
            n.task_info.get("examples_sha256") or {}
        ).get("test")
        if not same_test:
            return "different test examples: not judged"
        return _word(metric, c.diff, c.significant, f"p = {c.p:.2g}")
    if metric in ("step time", "tokens/s"):
        if not same_hw:
            return "different hardware: not judged"
        v = stats.step_time_verdict([n], [o], *noise)
        diff = (stats.run_median_s(n) or 0) - (stats.run_median_s(o) or 0)
        if v.unjudged in ("no steps", "no noise"):
            return "run-to-run noise not measured: not judged"
        if v.unjudged == "under load":
            return "measured under load: not judged"
        if v.unjudged == "machines":
            return "different hardware: not judged"
        return _word(metric, -diff if metric == "tokens/s" else diff, v.significant, v.why.split(" (")[0])
    return ""


def _word(metric: str, diff: float, significant: bool, evidence: str) -> str:
    if not significant or diff == 0:
        return f"within noise, {evidence}"
    up = diff > 0
    return f"{'▲' if up else '▼'} {'better' if up == HIGHER_IS_BETTER[metric] else 'worse'}, {evidence}"


EXACT_UNITS = {"peak memory": "bytes", "exports": "bytes", "trainable": "parameters"}  # counted, not timed


def _cell_text(metric: str, o: RunRecord, n: RunRecord, comparable: bool, same_hw: bool, noise: tuple) -> str:
    m = BY_KEY[PIVOT[metric]]
    get = (m.get, lambda v: text(m, v))
    a, b = get[0](o), get[0](n)
    if a is None and b is None:
        return "—"
    if a is None or b is None:
        return f"{get[1](a) if a is not None else '—'} → {get[1](b) if b is not None else '—'}"
    rel = f"{b - a:+.3f}" if metric == "accuracy" else (f"{(b - a) / a * 100:+.1f}%" if a else f"{b - a:+g}")
    if a != b and rel in ("+0.0%", "-0.0%") and metric in EXACT_UNITS:  # a change too small for a percentage
        rel = f"{b - a:+,.0f} {EXACT_UNITS[metric]}"
    verdict = _judge(metric, o, n, comparable, same_hw, noise) if comparable else ""
    if metric in EXACT_UNITS and comparable:
        verdict = "same" if a == b else ("▼ smaller" if b < a else "▲ larger") + " (exact, same seed and data)"
    if metric in ("step time", "tokens/s"):
        from reports.stats import under_load

        loaded = [side for side, r in (("OLD", o), ("NEW", n)) if under_load(r)]
        if loaded and not verdict.startswith("measured under load"):  # said even where another reason stops it
            verdict += f"{'; ' if verdict else ''}⚠ {' and '.join(loaded)} under load"
        if metric == "tokens/s" and (apart := _why_apart(o, n)):
            verdict += f"{'; ' if verdict else ''}{apart}"
    return f"{get[1](a)} → {get[1](b)} ({rel}{'; ' + verdict if verdict else ''})"


def _why_apart(o: RunRecord, n: RunRecord) -> str:
    """Why tokens/s moved otherwise than step time, where it did by more than 5 points: step time is the median
    measured step, tokens/s the real (non-pad) tokens over the total time of the measured steps. So the token
    count per step (padding, batch composition, group_by_length) and slow outlier steps (the mean, not the
    median) move one and not the other."""
    from reports.stats import run_median_s

    def parts(r: RunRecord) -> tuple[float, float, float] | None:
        times = measured_step_times_s(r)
        med = run_median_s(r)
        if not times or not med or not r.training.tokens_per_s:
            return None
        mean = sum(times) / len(times)
        return med, mean, r.training.tokens_per_s * mean  # tokens per measured step

    po, pn = parts(o), parts(n)
    if po is None or pn is None:
        return ""
    step_change, tps_change = pn[0] / po[0] - 1, n.training.tokens_per_s / o.training.tokens_per_s - 1
    if abs(step_change + tps_change) <= 0.05:  # faster steps, more tokens/s: they agree
        return ""
    why = []
    if abs(pn[2] / po[2] - 1) > 0.02:
        why.append(f"real tokens per step {po[2]:,.0f} → {pn[2]:,.0f}")
    if abs((pn[1] / pn[0]) / (po[1] / po[0]) - 1) > 0.02:
        why.append(f"mean/median step {po[1] / po[0]:.2f} → {pn[1] / pn[0]:.2f} (outlier steps)")
    why = why or ["tokens/s is real tokens over all measured time, step time the median step"]
    return "moves apart from step time: " + "; ".join(why)


def _run_noise(old: list[RunRecord], new: list[RunRecord]) -> tuple[float | None, int]:
    """Run-to-run spread of step time, from the seeds of each configuration within OLD and within NEW."""
    from reports import stats

    groups: dict[tuple, list[RunRecord]] = {}
    for side, rs in (("old", old), ("new", new)):
        for r in rs:
            if r.status == "ok":
                groups.setdefault((side, r.model, r.task, r.method, r.variant), []).append(r)
    return stats.run_to_run_sigma(list(groups.values()))


def pivot(old: list[RunRecord], new: list[RunRecord]) -> str:
    """PR-ready markdown: the warnings first, constant columns stated once, one row per cell, HTML-special
    characters escaped."""
    from reports.markdown import md as esc

    old_by, new_by = {key(r): r for r in old}, {key(r): r for r in new}
    both = [k for k in old_by if k in new_by]
    lines = [f"- {esc(w)}" for w in warnings(old, new)]
    same_hw = hardware_warning(old, new) is None
    names = ("model", "task", "method/variant", "seed")
    parts = [(k[0], k[1], f"{k[2]}/{k[3]}", str(k[4])) for k in both]
    constant = [i for i in range(4) if parts and len({p[i] for p in parts}) == 1]
    if constant:
        lines.insert(0, " · ".join(f"{names[i]}: **{esc(parts[0][i])}**" for i in constant))
    shown = [i for i in range(4) if i not in constant] or [2]
    metrics = ["accuracy", "peak memory", "step time", "tokens/s", "trainable", "exports"]
    diffs = {k: config_diff(effective(old_by[k]), effective(new_by[k])) for k in both}
    extra = ["config"] if any(diffs.values()) else []
    head = [names[i] for i in shown] + metrics + extra
    lines += ["", "| " + " | ".join(esc(h) for h in head) + " |", "|" + "---|" * len(head)]
    noise = _run_noise(old, new)
    for k, p in zip(both, parts, strict=True):
        o, n = old_by[k], new_by[k]
        cells = [p[i] for i in shown] + [_cell_text(m, o, n, not diffs[k], same_hw, noise) for m in metrics]
        if extra:
            cells.append("differs, not judged: " + "; ".join(diffs[k]) if diffs[k] else "same")
        lines.append("| " + " | ".join(esc(c) for c in cells) + " |")
    if not both:
        lines.append("(no cell is in both sets)")
    return "\n".join(lines)
