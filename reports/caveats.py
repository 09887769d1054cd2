"""What a reader must know before trusting a configuration's trained figures, said beside them in the summary,
the Markdown and the HTML report: a trained model that gives nearly every example one label (its accuracy is that
label's frequency), fp16 steps whose gradients overflowed and made no update, inputs cut to max_seq_len, training
budgets that differ between the configurations compared, an untrained start away from the base model's."""

from __future__ import annotations

from collections.abc import Iterable

from harness.records import RunRecord
from harness.tasks.data import cut_note
from reports.labels import trained_predictions


def skipped_step_warnings(records: Iterable[RunRecord]) -> list[str]:
    """One line per configuration whose fp16 loss scaling skipped steps (their gradients overflowed, so no update
    was made): a run reads as ``steps`` long but trained on fewer, and its step times include the skipped ones."""
    from collections import defaultdict

    by: dict[tuple[str, str, str], list[tuple[int, int, int]]] = defaultdict(list)
    for r in records:
        if r.status == "ok" and r.training.loss_scales:
            by[(r.model, r.task, f"{r.method}/{r.variant}")].append(
                (r.seed, len(r.training.skipped_steps), len(r.training.losses))
            )
    out = []
    for (model, task, name), runs in by.items():
        counts = sorted(n for _, n, _ in runs)
        if counts[-1]:
            many = f"{counts[0]}–{counts[-1]}" if counts[0] != counts[-1] else str(counts[0])
            seeds = ", ".join(str(s) for s, _, _ in sorted(runs))
            out.append(
                f"{model} · {task} · {name}: {many} of {runs[0][2]} steps skipped by fp16 loss scaling (seed(s) "
                f"{seeds}): their gradients overflowed, so they made no update"
            )
    return out


ONE_LABEL_SHARE, ONE_LABEL_EXCESS = 0.95, 0.15  # predicted for ≥ 95% of examples, ≥ 15 points above its true share


def one_label_warnings(records: Iterable[RunRecord]) -> list[str]:
    """One line per configuration whose trained model gives (nearly) every test example the same label: the
    share it predicts one label for (at least 95%) well above that label's true share. Its accuracy is then
    that label's frequency, not a reading of the task (seen: 20 steps of MiniLM on Rotten Tomatoes, 0.530
    from calling every snippet 'fresh')."""
    from collections import Counter, defaultdict

    by: dict[tuple[str, str, str], list[tuple[int, str, float, float, int]]] = defaultdict(list)
    for r in records:
        if (pair := trained_predictions(r)) is None:
            continue
        truth, predicted = pair
        label, n = Counter(predicted).most_common(1)[0]
        share, true_share = n / len(predicted), truth.count(label) / len(truth)
        if share >= ONE_LABEL_SHARE and share - true_share >= ONE_LABEL_EXCESS:
            names = (r.task_info or {}).get("labels") or []
            kind = (r.task_info or {}).get("kind")
            name = f"choice {label + 1}" if kind == "multiple_choice" or label >= len(names) else repr(names[label])
            by[(r.model, r.task, f"{r.method}/{r.variant}")].append((r.seed, name, share, true_share, len(truth)))
    out = []
    for (model, task, config), runs in by.items():
        runs.sort()
        seeds = ", ".join(str(s) for s, *_ in runs)
        _, name, share, true_share, n = runs[0]
        out.append(
            f"{model} · {task} · {config}: predicts {name} for {share:.0%} of the {n} test examples, of which "
            f"{true_share:.0%} are {name} (seed(s) {seeds}): its accuracy is that label's frequency, not a "
            "reading of the task"
        )
    return out


def cut_input_warnings(records: Iterable[RunRecord]) -> list[str]:
    """One line per model, task and max_seq_len whose inputs were cut to fit (at least 1% of the train or test
    split): every configuration read the same cut text, but what its accuracy measures is the task on that text
    (BBC News at 128 tokens: every article read to a third of its median length). Configurations are named where
    they differ in max_seq_len."""
    from collections import defaultdict

    by: dict[tuple[str, str, int], list[RunRecord]] = defaultdict(list)
    for r in records:
        if r.status == "ok" and r.input_lengths:
            by[(r.model, r.task, int((r.config.get("train") or {}).get("max_seq_len") or 0))].append(r)
    out = []
    for (model, task, max_len), runs in by.items():
        note = cut_note({k: v.model_dump() for k, v in runs[0].input_lengths.items()}, max_len)
        if note is None:
            continue
        several = sum(1 for m, t, _ in by if (m, t) == (model, task)) > 1
        who = " · " + ", ".join(sorted({f"{r.method}/{r.variant}" for r in runs})) if several else ""
        out.append(
            f"{model} · {task}{who}: {note}; a model reads only what fits (raise train.max_seq_len to read more)"
        )
    return out


def _numeric(item: tuple) -> tuple:
    return (item[0] is None, item[0] if isinstance(item[0], int | float) else 0)


BUDGET = ("steps", "batch_size", "grad_accum", "max_seq_len")  # what a configuration trained on, per method


def budget_warnings(records: Iterable[RunRecord]) -> list[str]:
    """One line per model and task whose configurations trained on different budgets (a method's own ``train:``
    steps, batch_size, grad_accum or max_seq_len): their accuracies compare those configurations, not the methods
    at equal training, and a headline verdict between them is read as such."""
    from collections import defaultdict

    by: dict[tuple[str, str], dict[str, dict[str, set]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(set)))
    for r in records:
        if r.status == "ok":
            train = r.config.get("train") or {}
            for field in BUDGET:
                by[(r.model, r.task)][field][train.get(field)].add(f"{r.method}/{r.variant}")
    out = []
    for (model, task), fields in by.items():
        differing = [
            f"{field} "
            + ", ".join(f"{v} ({', '.join(sorted(names))})" for v, names in sorted(values.items(), key=_numeric))
            for field, values in fields.items()
            if len(values) > 1
        ]
        if differing:
            out.append(
                f"{model} · {task}: configurations trained on different budgets — {'; '.join(differing)}: their "
                "accuracies compare these configurations, not the methods at equal training"
            )
    return out


def start_warnings(records: Iterable[RunRecord]) -> list[str]:
    """One line per configuration whose untrained model, as its method prepared it (quantized; random virtual
    tokens or prefix), answers the test examples differently beyond noise from the base model, on the same seeds
    and inputs: the untrained score of a configuration that starts as the base (``Method.starts_as_base``). Its
    gain is then over its own start, and the line says where training left it against the base (seen: prefix
    tuning on SmolLM2 started at 0.450 against the base's zero-shot 0.790, its gain read +0.080, within noise,
    for a model below the base)."""
    from collections import defaultdict
    from statistics import fmean

    from reports.stats import answers_versus, answers_vs

    base: dict[tuple, RunRecord] = {}
    by: dict[tuple, list[RunRecord]] = defaultdict(list)
    for r in records:
        if r.status != "ok" or r.starts_as_base is None or not (r.eval_before and r.eval_before.correct):
            continue
        if r.starts_as_base:
            base.setdefault(_inputs(r), r)
        elif r.eval_after:
            by[(r.model, r.task, f"{r.method}/{r.variant}")].append(r)
    out = []
    for (model, task, config), runs in by.items():
        pairs = [(base[k], r) for r in sorted(runs, key=lambda r: r.seed) if (k := _inputs(r)) in base]
        if not pairs or len(pairs) != len(runs):  # a seed without the base's score: no paired comparison
            continue
        bases = [b.eval_before.correct for b, _ in pairs]
        start = answers_versus(bases, [r.eval_before.correct for _, r in pairs])
        if start is None or start.p >= 0.05:
            continue
        after = answers_vs(bases, [r.eval_after.correct for _, r in pairs])
        b0 = fmean([b.eval_before.accuracy for b, _ in pairs])
        s0, t1 = fmean([r.eval_before.accuracy for _, r in pairs]), fmean([r.eval_after.accuracy for _, r in pairs])
        names = ", ".join(sorted({f"{b.method}/{b.variant}" for b, _ in pairs}))
        out.append(
            f"{model} · {task} · {config}: starts at {s0:.3f} untrained, as its method prepared the model, against "
            f"the base model's {b0:.3f} ({names} untrained; {start}): its gain is over its own start; trained, "
            f"{t1:.3f} against the base's {b0:.3f}: {after}"
        )
    return out


def edge_warnings(records: Iterable[RunRecord]) -> list[str]:
    """One line per tuned configuration whose chosen number is the largest or smallest of the 3 or more values its
    study tried: its best may lie beyond the range searched, and the comparison may hold that method back."""
    from harness.studies import fmt_param

    out, seen = [], set()
    for r in records:
        t, name = r.config.get("tuning") or {}, f"{r.method}/{r.variant}"
        if r.status != "ok" or not t or (r.model, r.task, name) in seen:
            continue
        seen.add((r.model, r.task, name))
        for k, v in (t.get("best_params") or {}).items():
            tried = {h["params"][k] for h in t.get("history") or [] if isinstance(h["params"].get(k), (int, float))}
            if len(tried) >= 3 and v in (min(tried), max(tried)):
                end = "largest" if v == max(tried) else "smallest"
                out.append(
                    f"{r.model} · {r.task} · {name}: its tuned {k}, {fmt_param(v)}, is the {end} of the {len(tried)} "
                    "values its study tried: its best may lie beyond the range searched (tune.space widens it)"
                )
    return out


def new_module_warnings(records: Iterable[RunRecord]) -> list[str]:
    """One line per model whose checkpoint had no weights for modules besides a classifier head (DeBERTa-v3's
    ``pooler.dense``; a body layer of a checkpoint that does not match its config): every method trained them
    from random in full, which its figures include."""
    new: dict[str, set[str]] = {}
    for r in records:
        names = [n for n in r.model_info.get("new_modules") or [] if not n.endswith(("classifier", "score"))]
        if r.status == "ok" and names:
            new.setdefault(r.model, set()).update(names)
    return [
        f"{model}: the checkpoint has no weights for {', '.join(sorted(names))}: initialized at random and trained "
        "in full by every method"
        for model, names in new.items()
    ]


def _inputs(r: RunRecord) -> tuple:
    return (r.model, r.task, r.seed, (r.config.get("train") or {}).get("max_seq_len"))


def training_warnings(records: Iterable[RunRecord]) -> list[str]:
    """What a reader must know before trusting a configuration's trained figures: budgets that differ between
    configurations, a tuned value at the edge of what its study tried, inputs cut to max_seq_len, an untrained
    start away from the base model's, a model that predicts one label whatever the input, fp16 steps that made no
    update."""
    records = list(records)
    caveats = budget_warnings(records) + edge_warnings(records) + cut_input_warnings(records) + start_warnings(records)
    return caveats + new_module_warnings(records) + one_label_warnings(records) + skipped_step_warnings(records)
