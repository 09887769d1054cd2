"""Each label's recall per configuration, for classification tasks: which classes a method gets right, not only
how many examples. Recall is the share of a label's test examples predicted as that label (mean over seeds);
beside it, the share of all test examples predicted as that label, which shows a model leaning on one label.
Read from each run's ``eval_after.predicted`` and the task's ``test_label_ids``."""

from __future__ import annotations

import html
import statistics
from collections import defaultdict

import numpy as np

from harness.records import RunRecord
from reports.stats import wilson_over_seeds


def _scored(r: RunRecord) -> bool:
    truth = (r.task_info or {}).get("test_label_ids")
    ev = r.eval_after
    return (
        r.status == "ok"
        and (r.task_info or {}).get("kind") == "classification"
        and ev is not None
        and bool(ev.predicted)
        and bool(truth)
        and len(truth) == len(ev.predicted)
    )


def applies(records: list[RunRecord]) -> bool:
    """Any trained classification run kept its predictions."""
    return any(_scored(r) for r in records)


def per_label(r: RunRecord) -> list[tuple[float | None, float]]:
    """(recall, predicted share) per label index of one run; recall None for a label absent from the test split."""
    truth, predicted = r.task_info["test_label_ids"], r.eval_after.predicted
    n_labels = max(len(r.task_info.get("labels") or []), max(truth) + 1, max(predicted) + 1)
    out = []
    for k in range(n_labels):
        of_k = [p for t, p in zip(truth, predicted, strict=True) if t == k]
        recall = sum(p == k for p in of_k) / len(of_k) if of_k else None
        out.append((recall, sum(p == k for p in predicted) / len(predicted)))
    return out


WIDE = 8  # more labels than this: a row per label


def _cell(runs: list[RunRecord], truth: list[int], k: int) -> str:
    """Label ``k``'s recall over ``runs`` (seeds) with its interval, and the share of examples given ``k``."""
    share = statistics.fmean(sum(p == k for p in r.eval_after.predicted) / len(truth) for r in runs)
    of_k = [i for i, t in enumerate(truth) if t == k]
    if not of_k:
        return f'<td class="num">— <small>({share:.0%})</small></td>'
    # each of the label's examples right on how many seeds: the interval is over its examples
    right = np.mean([[r.eval_after.predicted[i] == k for i in of_k] for r in runs], axis=0)
    lo, hi = wilson_over_seeds(right, len(runs))
    return f'<td class="num">{right.mean():.2f} <small>[{lo:.2f}, {hi:.2f}] ({share:.0%})</small></td>'


def render(records: list[RunRecord]) -> str:
    """A table per (model, task): a row per configuration, a column per label: recall (predicted share)."""
    by: dict[tuple[str, str], dict[str, list[RunRecord]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        if _scored(r):
            by[(r.model, r.task)][f"{r.method}/{r.variant}"].append(r)
    parts = [
        '<p class="note">Recall: the share of a label\'s test examples the trained model gave that label (mean '
        "over seeds), with its 95% interval over that label's examples (few examples: a wide interval). In "
        "parentheses: the share of all test examples it gave that label, to read beside the label's own share in "
        "the header.</p>"
    ]
    for (model, task), configs in by.items():
        first = next(iter(configs.values()))[0]
        truth, names = first.task_info["test_label_ids"], first.task_info.get("labels") or []
        n_labels = len(per_label(first))
        labels = [
            f"{html.escape(names[k] if k < len(names) else str(k))} "
            f"<small>({truth.count(k)}, {truth.count(k) / len(truth):.0%})</small>"
            for k in range(n_labels)
        ]
        columns = {  # configuration -> its cell per label
            f"{html.escape(name)}" + (f" <small>({len(runs)} seeds)</small>" if len(runs) > 1 else ""): [
                _cell(runs, truth, k) for k in range(n_labels)
            ]
            for name, runs in sorted(configs.items())
        }
        if n_labels <= WIDE:  # a row per configuration, a column per label
            head = "".join(f"<th>{x}</th>" for x in labels)
            rows = [f"<tr><td>{c}</td>{''.join(cells)}</tr>" for c, cells in columns.items()]
            first_head = "configuration"
        else:  # many labels: a row per label, so the page grows down, not sideways
            head = "".join(f"<th>{c}</th>" for c in columns)
            rows = [f"<tr><td>{x}</td>{''.join(cs[k] for cs in columns.values())}</tr>" for k, x in enumerate(labels)]
            first_head = "label"
        parts.append(
            f"<h3>{html.escape(model)} · {html.escape(task)}</h3>"
            f'<div class="scroll"><table><thead><tr><th>{first_head}</th>{head}</tr></thead>'
            f"<tbody>{''.join(rows)}</tbody></table></div>"
        )
    return "".join(parts)
