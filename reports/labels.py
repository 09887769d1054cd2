"""Each label's recall per configuration, for classification tasks: which classes a method gets right, not only
how many examples. Recall is the share of a label's test examples predicted as that label (mean over seeds);
beside it, the share of all test examples predicted as that label, which shows a model leaning on one label.
Read from each run's ``eval_after.predicted`` and the task's ``test_label_ids``."""

from __future__ import annotations

import html
import statistics
from collections import defaultdict

import numpy as np

from harness.records import RunRecord, label_ids
from reports.stats import wilson_over_seeds


def trained_predictions(r: RunRecord) -> tuple[list[int], list[int]] | None:
    """(the right labels, the trained model's predicted labels) over the test split, in order; None where the run
    did not finish ok or its record keeps no predictions that align with the split."""
    truth = label_ids((r.task_info or {}).get("test_label_ids"))
    predicted = label_ids(r.eval_after.predicted if r.eval_after is not None else None)
    if r.status != "ok" or not predicted or len(truth) != len(predicted):
        return None
    return truth, predicted


def _scored(r: RunRecord) -> bool:
    return (r.task_info or {}).get("kind") == "classification" and trained_predictions(r) is not None


def applies(records: list[RunRecord]) -> bool:
    """Any trained classification run kept its predictions."""
    return any(_scored(r) for r in records)


def per_label(r: RunRecord) -> list[tuple[float | None, float]]:
    """(recall, predicted share) per label index of one run; recall None for a label absent from the test split."""
    truth, predicted = trained_predictions(r)
    n_labels = max(len(r.task_info.get("labels") or []), max(truth) + 1, max(predicted) + 1)
    out = []
    for k in range(n_labels):
        of_k = [p for t, p in zip(truth, predicted, strict=True) if t == k]
        recall = sum(p == k for p in of_k) / len(of_k) if of_k else None
        out.append((recall, sum(p == k for p in predicted) / len(predicted)))
    return out


WIDE = 8  # more labels than this: a row per label
NOTE = (
    "Recall: the share of a label's test examples the trained model gave that label (mean over seeds), with its "
    "95% interval over that label's examples (few examples: a wide interval). In parentheses: the share of all "
    "test examples it gave that label, to read beside the label's own share in the header."
)


def _cell(runs: list[RunRecord], truth: list[int], k: int) -> tuple[str, str]:
    """Label ``k``'s recall over ``runs`` (seeds), and its interval with the share of examples given ``k``."""
    predicted = [trained_predictions(r)[1] for r in runs]
    share = statistics.fmean(sum(p == k for p in ps) / len(truth) for ps in predicted)
    of_k = [i for i, t in enumerate(truth) if t == k]
    if not of_k:
        return "—", f"({share:.0%})"
    # each of the label's examples right on how many seeds: the interval is over its examples
    right = np.mean([[ps[i] == k for i in of_k] for ps in predicted], axis=0)
    lo, hi = wilson_over_seeds(right, len(runs))
    return f"{right.mean():.2f}", f"[{lo:.2f}, {hi:.2f}] ({share:.0%})"


def grids(records: list[RunRecord]) -> list[tuple[str, str, list[str], list[tuple[str, list[tuple[str, str]]]]]]:
    """Per (model, task): (title, first column's name, the other columns' names, rows of (name, cells)), each cell
    (figure, its interval and share). A row per configuration and a column per label, or, past ``WIDE`` labels,
    a row per label."""
    by: dict[tuple[str, str], dict[str, list[RunRecord]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        if _scored(r):
            by[(r.model, r.task)][f"{r.method}/{r.variant}"].append(r)
    out = []
    for (model, task), configs in by.items():
        first = next(iter(configs.values()))[0]
        truth, names = trained_predictions(first)[0], first.task_info.get("labels") or []
        n = len(per_label(first))
        label_names = [
            f"{names[k] if k < len(names) else k} ({truth.count(k)}, {truth.count(k) / len(truth):.0%})"
            for k in range(n)
        ]
        cells = {
            name + (f" ({len(runs)} seeds)" if len(runs) > 1 else ""): [_cell(runs, truth, k) for k in range(n)]
            for name, runs in sorted(configs.items())
        }
        if n <= WIDE:
            out.append((f"{model} · {task}", "configuration", label_names, list(cells.items())))
        else:
            rows = [(x, [cs[k] for cs in cells.values()]) for k, x in enumerate(label_names)]
            out.append((f"{model} · {task}", "label", list(cells), rows))
    return out


def render(records: list[RunRecord]) -> str:
    """The HTML section: a table per (model, task), each recall with its interval and share in small type."""
    parts = [f'<p class="note">{html.escape(NOTE)}</p>']
    for title, first, columns, rows in grids(records):
        head = "".join(f"<th>{html.escape(c)}</th>" for c in [first, *columns])
        body = "".join(
            f"<tr><td>{html.escape(name)}</td>"
            + "".join(f'<td class="num">{v} <small>{html.escape(extra)}</small></td>' for v, extra in cells)
            + "</tr>"
            for name, cells in rows
        )
        parts.append(
            f"<h3>{html.escape(title)}</h3>"
            f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'
        )
    return "".join(parts)


def to_markdown(records: list[RunRecord]) -> str:
    """The same tables in Markdown, for ``report --format md``: '' where no run is a scored classification."""
    from reports.markdown import md, md_table

    lines: list[str] = []
    for title, first, columns, rows in grids(records):
        lines += [f"**Each label's recall · {md(title)}**", ""]
        lines += md_table([first, *columns], [[name] + [f"{v} {extra}" for v, extra in cells] for name, cells in rows])
        lines.append("")
    return "\n".join(lines + [f"_{md(NOTE)}_"]) if lines else ""
