"""The tuning section: each method's trials (validation objective against learning rate), the chosen one, the
ratio of the LoRA family's best learning rate to full fine-tuning's, the trial table, and Optuna's own figures
of each study (read from ``RESULTS/tuning/studies.journal`` or the study's database), embedded as they are."""

from __future__ import annotations

import html
import math
from collections import defaultdict
from pathlib import Path

import plotly.graph_objects as go

from harness.records import RunRecord
from harness.studies import fmt_param as _fmt
from harness.studies import fmt_params
from reports.figures import SERIES_COLORS, _layout


def tuned(records: list[RunRecord]) -> dict[tuple[str, str], dict[str, dict]]:
    """(model, task) → method/variant → its tuning summary (one per configuration: seeds share it)."""
    out: dict[tuple[str, str], dict[str, dict]] = defaultdict(dict)
    for r in records:
        t = r.config.get("tuning")
        if t:
            out[(r.model, r.task)].setdefault(f"{r.method}/{r.variant}", t)
    return dict(out)


def label(r: RunRecord) -> str:
    """How a run's hyperparameters were chosen, for the headline."""
    t = r.config.get("tuning")
    if not t:
        return "hand-set"
    params = fmt_params(t["best_params"])
    return f"tuned: {t['trials']} trials on {t['objective']} ({params})"


def lr_figure(studies: dict[str, dict]) -> go.Figure:
    """Validation score against learning rate, per method, the chosen trial starred."""
    fig = go.Figure()
    objective = next(iter(studies.values()))["objective"]
    for i, (name, t) in enumerate(studies.items()):
        pts = [h for h in t["history"] if h["value"] is not None and "lr" in h["params"]]
        colour = SERIES_COLORS[i % len(SERIES_COLORS)]
        fig.add_scatter(
            x=[h["params"]["lr"] for h in pts],
            y=[h["value"] for h in pts],
            mode="markers",
            name=html.escape(name),
            legendgroup=html.escape(name),
            marker=dict(size=9, color=colour),
            hovertext=[html.escape(f"trial {h['number']}: {h['params']}") for h in pts],
        )
        if "lr" in t["best_params"]:
            fig.add_scatter(
                x=[t["best_params"]["lr"]],
                y=[t["best_value"]],
                mode="markers",
                name=html.escape(f"{name}: chosen"),
                legendgroup=html.escape(name),
                marker=dict(symbol="star", size=17, color=colour, line=dict(width=1, color="#000")),
            )
    fig.update_layout(
        **_layout(f"Validation {objective} against learning rate, per method", "learning rate", objective)
    )
    fig.update_xaxes(type="log")
    return fig


def lr_ratio(studies: dict[str, dict], trains_all: set[str]) -> list[str]:
    """Each parameter-efficient configuration's best learning rate over that of one that trains every parameter
    (``trains_all``: known from the records, not from method names), with the range the three best trials span
    (how flat the optimum is: the spread a single chosen point hides)."""
    full_name = next((n for n, t in studies.items() if n in trains_all and "lr" in t["best_params"]), None)
    if full_name is None:
        return []
    full = studies[full_name]

    def top(t: dict) -> list[float]:
        done = sorted((h for h in t["history"] if h["value"] is not None), key=lambda h: h["value"])
        best = done[::-1] if t["objective"] == "val_accuracy" else done
        return [h["params"]["lr"] for h in best[:3] if "lr" in h["params"]]

    out = []
    for name, t in studies.items():
        if name not in trains_all and "lr" in t["best_params"]:
            ratio = t["best_params"]["lr"] / full["best_params"]["lr"]
            a, b = top(t), top(full)
            spread = f" (its 3 best trials against full's: ×{min(a) / max(b):.2g} to ×{max(a) / min(b):.2g})"
            out.append(f"{name}: best learning rate ×{ratio:.3g} {full_name}'s{spread if a and b else ''}")
    return out


def _table(studies: dict[str, dict]) -> str:
    rows = []
    for name, t in studies.items():
        for h in t["history"]:
            chosen = " ☆" if h["params"] == t["best_params"] and h["value"] == t["best_value"] else ""
            value = (
                "—"
                if h["value"] is None or (isinstance(h["value"], float) and math.isnan(h["value"]))
                else f"{h['value']:.4f}"
            )
            params = fmt_params(h["params"])
            loss = f"{h['val_loss']:.4f}" if isinstance(h.get("val_loss"), float) else "—"
            cells = [name, str(h["number"]), params, value + chosen, loss, h["state"].lower()]
            rows.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
    titles = ("configuration", "trial", "parameters", "validation value", "validation loss", "state")
    head = "".join(f"<th>{c}</th>" for c in titles)
    gaps = any([h["number"] for h in t["history"]] != list(range(len(t["history"]))) for t in studies.values())
    note = (
        '<p class="note">Trial numbers are Optuna\'s: they skip the trials a killed runner left unfinished and '
        "the draws set aside as repeats of a configuration that had already run, none of which counts.</p>"
        if gaps
        else ""
    )
    return (
        f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table></div>{note}'
    )


def optuna_figures(results_dir: Path | None, studies: dict[str, dict], prefix: str) -> list[tuple[str, go.Figure]]:
    """Optuna's own figures of each study, where its storage is there to read: the journal in the results dir
    (an exported records folder alone has none) or the database the records name (not one whose password the
    records hide)."""
    import optuna
    from optuna.visualization import plot_optimization_history, plot_parallel_coordinate

    from harness.studies import storage as _storage

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    journal = Path(results_dir) / "tuning" / "studies.journal" if results_dir else None
    out = []
    for name, t in studies.items():
        where = t.get("storage")
        if where is None or "://" not in where:  # the journal: wherever this results dir now is
            if journal is None or not journal.exists():
                continue
            where = str(journal)
        try:
            study = optuna.load_study(study_name=t.get("study") or f"{prefix}|{name}", storage=_storage(where))
        except Exception:  # gone, renamed, unreachable: the section's own figures and table stand without it
            continue
        out.append((f"{prefix}|{name}: optimization history", plot_optimization_history(study)))
        if len(study.best_trial.params) > 1:
            out.append((f"{prefix}|{name}: parallel coordinates", plot_parallel_coordinate(study)))
    return out


HAND_SET = (
    "Every configuration ran at hand-set hyperparameters (the suite has no `tune:` block): a difference between "
    "methods may be nothing more than a better-guessed learning rate."
)


def notes(records: list[RunRecord], studies: dict[str, dict]) -> list[tuple[str, str]]:
    """What to say of one (model, task)'s studies, as (``note`` or ``warn``, text), for the HTML section and the
    Markdown alike: the budget, trials that all scored the same, ties at the best, the learning rates' ratio."""
    budgets = {t["trials"] for t in studies.values()}
    same = "the same budget for every method" if len(budgets) == 1 else "budgets differ between methods"
    out = [
        (
            "note",
            f"{', '.join(map(str, sorted(budgets)))} trials per method ({same}), selected on the validation split; "
            "the test split was read only by the final runs.",
        )
    ]
    flat = [n for n, t in studies.items() if len({h["value"] for h in t["history"] if h["value"] is not None}) == 1]
    if flat:
        by_loss = all(studies[n].get("tied_at_best") for n in flat)  # records since ties are broken by loss
        chosen = "has the lowest validation loss" if by_loss else "is simply the first"
        out.append(
            (
                "warn",
                f"Every trial of {', '.join(flat)} scored the same on validation: the chosen one {chosen}, and says "
                "little about which configuration is better (a larger validation set, more steps or the loss as the "
                "objective may tell them apart).",
            )
        )
    for n, t in studies.items():
        if n not in flat and t.get("tied_at_best", 1) > 1:
            tie = f"{n}: {t['tied_at_best']} trials tied at the best validation value; the one with the lowest "
            out.append(("note", tie + "validation loss was chosen."))
    everything = [r for r in records if r.total_params and r.trainable_params == r.total_params]
    return out + [("", line) for line in lr_ratio(studies, {f"{r.method}/{r.variant}" for r in everything})]


def to_markdown(records: list[RunRecord]) -> str:
    """How each configuration's hyperparameters were chosen, for ``report --format md``: per (model, task) the
    chosen values, the best validation value, the trials and the notes; one line where nothing was tuned."""
    from reports.markdown import md, md_table

    by = tuned([r for r in records if r.status == "ok"])
    if not by:
        return f"_{md(HAND_SET)}_" if any(r.status == "ok" for r in records) else ""
    lines: list[str] = []
    for (model, task), studies in by.items():
        lines += [f"**Hyperparameters, tuned on the validation split · {md(model)} · {md(task)}**", ""]
        rows = [
            [
                name,
                fmt_params(t["best_params"]),
                f"{t['objective']} {_fmt(t['best_value'])}",
                f"{t['trials']} ({t.get('trials_pruned', 0)} pruned, {t.get('trials_failed', 0)} failed)",
                t.get("sampler", "—"),
            ]
            for name, t in studies.items()
        ]
        lines += md_table(["configuration", "chosen", "best on validation", "trials", "sampler"], rows) + [""]
        lines += [
            f"> **warning:** {md(text)}\n" if kind == "warn" else md(text) + "\n"
            for kind, text in notes(records, studies)
        ]
    return "\n".join(lines)


def render(records: list[RunRecord], results_dir: Path | None, figure_html) -> str:
    """The section's HTML; ``figure_html(fig, id)`` embeds a figure the way the rest of the report does."""
    by = tuned(records)
    if not by:
        text = html.escape(HAND_SET).replace("`tune:`", "<code>tune:</code>")
        return f'<p class="note">{text.replace("hand-set hyperparameters", "<b>hand-set hyperparameters</b>")}</p>'
    parts = []
    for k, ((model, task), studies) in enumerate(by.items()):
        budget, *rest = (
            f'<p class="{c}">{html.escape(t)}</p>' if c else f"<p>{html.escape(t)}</p>"
            for c, t in notes(records, studies)
        )
        parts += [f"<h3>{html.escape(model)} · {html.escape(task)}</h3>", budget]
        parts += [figure_html(lr_figure(studies), f"fig-tune-lr-{k}"), *rest, _table(studies)]
        for j, (title, fig) in enumerate(optuna_figures(results_dir, studies, f"{model}|{task}")):
            parts.append(f"<h4>{html.escape(title)}</h4>" + figure_html(fig, f"fig-tune-optuna-{k}-{j}"))
    return "".join(parts)
