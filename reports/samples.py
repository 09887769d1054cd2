"""What a generation task's models wrote: the first test examples' reference answers and each configuration's
greedy generation before and after training (its lowest seed), each marked right or wrong as it was scored.
A score of 0 may be a model that cannot do the task or a reading of its output that misses the answer; the
text tells them apart."""

from __future__ import annotations

import html
from collections import defaultdict

from harness.records import EvalMetrics, RunRecord


def applies(records: list[RunRecord]) -> bool:
    """Any run kept generated answers (generation tasks through prompts)."""
    return any(r.eval_after is not None and r.eval_after.generated_samples for r in records)


def cut_warnings(records: list[RunRecord]) -> list[str]:
    """One line per configuration whose generations ran into ``max_new_tokens`` before ending (its lowest seed,
    before and after training): an answer cut short is scored as it stands, so its accuracy undercounts."""
    seen, out = set(), []
    for r in sorted(records, key=lambda r: r.seed):
        name = f"{r.method}/{r.variant}"
        if r.status != "ok" or (r.model, r.task, name) in seen:
            continue
        seen.add((r.model, r.task, name))
        parts = [
            f"{ev.generations_cut} of {ev.examples} {when}"
            for when, ev in (("untrained", r.eval_before), ("trained", r.eval_after))
            if ev is not None and ev.generations_cut
        ]
        if parts:
            limit = (r.config.get("task") or {}).get("max_new_tokens", "max_new_tokens")
            out.append(
                f"{r.model} · {r.task} · {name}: {' and '.join(parts)} answers ran into max_new_tokens ({limit}) "
                "before a newline or the end of text, and were scored cut short: give them room"
            )
    return out


def _cell(ev: EvalMetrics | None, i: int) -> str:
    if ev is None or not ev.generated_samples or i >= len(ev.generated_samples):
        return "—"
    right = ev.correct is not None and i < len(ev.correct) and ev.correct[i] == "1"
    return f"{'✓' if right else '✗'} <code>{html.escape(repr(ev.generated_samples[i]['generated']))}</code>"


def render(records: list[RunRecord]) -> str:
    """One table per (model, task): a row per kept example, a column per configuration (before → after)."""
    by: dict[tuple[str, str], dict[str, RunRecord]] = defaultdict(dict)
    for r in sorted(records, key=lambda r: r.seed):
        if r.status == "ok" and r.eval_after is not None and r.eval_after.generated_samples:
            by[(r.model, r.task)].setdefault(f"{r.method}/{r.variant}", r)
    parts = [f'<p class="warn">{html.escape(line)}</p>' for line in cut_warnings(records)]
    for (model, task), runs in by.items():
        first = next(iter(runs.values()))
        seeds = ", ".join(sorted({f"{n}: seed {r.seed}" for n, r in runs.items()}))
        parts.append(
            f"<h3>{html.escape(model)} · {html.escape(task)}</h3>"
            f'<p class="note">The first {len(first.eval_after.generated_samples)} test examples, greedy, cut at '
            f"the first newline, ✓ where scored right ({html.escape(seeds)}).</p>"
        )
        head = "".join(f"<th>{html.escape(n)}: before → after</th>" for n in runs)
        rows = []
        for i, sample in enumerate(first.eval_after.generated_samples):
            cells = "".join(f"<td>{_cell(r.eval_before, i)}<br>→ {_cell(r.eval_after, i)}</td>" for r in runs.values())
            rows.append(f"<tr><td>{i}</td><td>{html.escape(str(sample['answer']))}</td>{cells}</tr>")
        parts.append(
            f'<div class="scroll"><table><thead><tr><th>#</th><th>answer</th>{head}</tr></thead>'
            f"<tbody>{''.join(rows)}</tbody></table></div>"
        )
    return "".join(parts)
