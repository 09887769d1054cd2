"""The compact summary a terminal shows after ``ftbench run`` and ``ftbench summary``: per (model, task), one row
per configuration with the figures compared first and the headline's verdicts (reports/headline.py), fitting the
terminal (100 columns when the output is not one). The wide table (``--wide``), ``report --format md|csv`` and
the HTML report keep every column."""

from __future__ import annotations

import statistics

from harness.records import RunRecord
from reports import headline, stats
from reports.metrics import fmt_pct

PIPE_WIDTH = 100  # columns when stdout is a file or a pipe (a log, CI)
HEAD = ("method", "trains", "peak", "step", "accuracy [95% CI]", "gain", "vs the most accurate")
LEGEND = (
    "trains: the share of parameters the optimizer updates · peak: CPU live tensors or CUDA allocated, as the "
    "report names it · step: median of timed steps, ⚠ where measured under load · gain: accuracy after − before "
    "on the same test examples, ✓ beyond noise (✗ a loss beyond noise), ≈ within noise · vs the most accurate: "
    "paired test on the same examples, p Holm-adjusted; a tie is within noise (seed noise: p below 0.05, but the "
    "seeds' difference is under 2 standard errors) · every column: --wide, report.html"
)


def console():
    """A rich console as wide as the terminal, or PIPE_WIDTH columns when the output is not a terminal."""
    from rich.console import Console

    c = Console()
    return c if c.is_terminal else Console(width=PIPE_WIDTH)


def _p(p: float | None) -> str:
    """At most three decimals, so that a verdict is at most 24 columns ("within noise (p = 0.049)") and a row with
    three seeds' spread and the under-load mark still fits 100 columns."""
    if p is None:
        return "not testable"
    return "p < 0.001" if p < 0.001 else f"p = {p:.3f}" if p < 0.1 else f"p = {p:.2g}"


def _size(n: float) -> str:
    """Bytes in three significant figures: 318 MiB, 1.41 GiB."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 999.5 or unit == "TiB":
            return f"{n:.3g} {unit}" if n >= 1 else f"{n:.0f} {unit}"
        n /= 1024
    return "—"


def _row(c: headline.Config, verdict: str, spread: bool = False) -> list[str]:
    """A configuration's row; with ``spread`` (Markdown, to publish) the peak carries its std over seeds and the
    step time its interquartile range, as the HTML headline's do."""
    r = c.runs[0]
    peaks = c.peaks()
    peak = _size(statistics.fmean(peaks)) if peaks else "—"
    if spread and len(peaks) > 1:
        peak += f" ± {_size(statistics.stdev(peaks))}"
    step = c.median_step_s()
    step_text = f"{step * 1000:.0f} ms" if step else "—"
    if spread and step and len(c.steps_s()) > 1:
        q = statistics.quantiles(c.steps_s(), n=4)
        step_text += f" (IQR {q[0] * 1000:.0f}–{q[2] * 1000:.0f})"
    if step and any(map(stats.under_load, c.runs)):
        step_text += "⚠"
    g = stats.gain(c.runs)
    return [
        c.name.removesuffix("/default"),
        fmt_pct(r.trainable_pct),
        peak,
        step_text,
        _accuracy(c.acc),
        f"{g.diff:+.3f} {('✓' if g.diff > 0 else '✗') if g.significant else '≈'}",  # a check beside a loss misreads
        verdict,
    ]


def _accuracy(acc: stats.Summary) -> str:
    """Mean, its spread over seeds where there are several, and the 95% interval: the seed count is the
    caption's, so a row stays one line at 100 columns."""
    spread = f" ± {acc.std:.3f}" if acc.seeds > 1 else ""
    return f"{acc.mean:.3f}{spread} [{acc.ci[0]:.3f}, {acc.ci[1]:.3f}]"


def _verdicts(ranked: list[headline.Config]) -> dict[str, str]:
    """Each configuration against the most accurate (``ranked[0]``), from one family of paired tests:
    "most accurate", "within noise (p = …)" or "below (p = …)"."""
    if len(ranked) == 1:
        return {ranked[0].name: ""}
    pairs = stats.compare_all({c.name: c.acc for c in ranked})
    top = ranked[0].name
    out = {top: "most accurate" if pairs[(top, ranked[1].name)].significant else "most accurate, a tie"}
    for c in ranked[1:]:
        p = pairs[(top, c.name)]
        word = "below" if p.significant else p.noise.replace("within seed noise", "seed noise")  # 100 columns
        out[c.name] = f"{word} ({_p(p.p)})"
    return out


def _caption(model: str, task: str, cs: dict, seeds: list[int]) -> str:
    """'minilm-l6 · rotten_tomatoes · 400 test examples · 1 seed(s) · bf16': the dtype the runs trained in, as
    resolved (`auto` differs by machine, and step times with it), or each of them where they differ."""
    from reports.summary import train_dtype

    first = next(iter(cs.values()))
    dtypes = sorted({d for c in cs.values() for r in c.runs if (d := train_dtype(r))})
    return " · ".join(
        [model, task, f"{first.acc.examples} test examples", f"{len(seeds)} seed(s)"]
        + ([", ".join(dtypes) if len(dtypes) == 1 else f"dtypes {', '.join(dtypes)}"] if dtypes else [])
    )


def tables(records: list[RunRecord], title: str = "") -> list:
    """Rich renderables: a table per (model, task), then one line per run that did not finish ok."""
    from rich import box
    from rich.markup import escape
    from rich.table import Table
    from rich.text import Text

    out: list = []
    for (model, task), cs in headline.configs(records).items():
        seeds = sorted({r.seed for c in cs.values() for r in c.runs})
        caption = _caption(model, task, cs, seeds)
        # the caption above the table, not its title: a title wraps at the table's width ("· 1 seed(s) ·\nbf16")
        out.append(Text(" · ".join(x for x in (title, caption) if x), style="italic"))
        table = Table(
            box=box.SIMPLE_HEAD,
            pad_edge=False,
            show_edge=False,
            collapse_padding=True,
        )
        head = [h.replace("accuracy", "accuracy ± sd") if len(seeds) > 1 and h == HEAD[4] else h for h in HEAD]
        for i, h in enumerate(head):
            table.add_column(h, overflow="fold", justify="right" if 0 < i < 4 else "left", no_wrap=0 < i < 6)
        ranked = sorted(cs.values(), key=lambda c: -c.acc.mean)
        verdicts = _verdicts(ranked)
        for c in ranked:
            table.add_row(*(escape(x) for x in _row(c, verdicts[c.name])))
        out.append(table)
        if chosen := tuned_line([r for c in ranked for r in c.runs]):
            out.append(Text(chosen))
    out += measured_only_tables(records, title)
    from reports.caveats import training_warnings
    from reports.samples import cut_warnings
    from reports.stats import hardware_of

    out += [Text(f"warning: {line}", style="yellow") for line in cut_warnings(records) + training_warnings(records)]
    machines = sorted({hardware_of(r) for r in records})
    if len(machines) > 1:  # a results dir resumed elsewhere: its step times and MFU do not compare
        out.append(
            Text(
                f"warning: these runs come from {len(machines)} machines: {' | '.join(machines)}; step time "
                "and MFU do not compare across them",
                style="yellow",
            )
        )
    commits = sorted({str(r.environment.get("git_commit"))[:10] for r in records if r.environment.get("git_commit")})
    if len(commits) > 1:  # a results dir resumed after an upgrade: earlier records keep the earlier code's figures
        what = f"{len(commits)} commits ({', '.join(commits)})"
        out.append(Text(f"warning: these runs come from {what}: different code measured them", style="yellow"))
    for r in records:
        if r.status != "ok":
            why = (r.error or "").strip().splitlines()[0][:200] if r.error else ""
            out.append(Text(f"{r.status}: {r.model} · {r.task} · {r.method}/{r.variant} · seed {r.seed}: {why}"))
    if out:
        out += [Text(""), Text(LEGEND, style="dim")]
    return out


def to_markdown(records: list[RunRecord], title: str = "") -> str:
    """The summary's tables as Markdown, to publish where the HTML page cannot go (a README, an issue): a
    table per (model, task), each configuration over its seeds with its interval and verdicts, then the runs
    that did not finish ok and the legend."""
    from reports.markdown import md, md_table

    lines: list[str] = []
    for (model, task), cs in headline.configs(records).items():
        seeds = sorted({r.seed for c in cs.values() for r in c.runs})
        caption = _caption(model, task, cs, seeds)
        head = [h.replace("accuracy", "accuracy ± sd") if len(seeds) > 1 and h == HEAD[4] else h for h in HEAD]
        ranked = sorted(cs.values(), key=lambda c: -c.acc.mean)
        verdicts = _verdicts(ranked)
        lines += [f"**{md(' · '.join(x for x in (title, caption) if x))}**", ""]
        lines += md_table(head, [_row(c, verdicts[c.name], spread=True) for c in ranked]) + [""]
    lines += [
        f"- {md(f'{r.status}: {r.model} · {r.task} · {r.method}/{r.variant} · seed {r.seed}')}: "
        f"{md((r.error or '').strip().splitlines()[0][:200] if r.error else '')}"
        for r in records
        if r.status != "ok"
    ]
    from reports.caveats import training_warnings
    from reports.samples import cut_warnings

    if lines and lines[-1]:
        lines.append("")  # a blank line: the legend must not read as part of the last failure's list item
    lines += [f"> **warning:** {md(w)}\n" for w in cut_warnings(records) + training_warnings(records)]
    return "\n".join(lines + ([f"_{md(LEGEND)}_"] if lines else []))


def tuned_line(runs: list[RunRecord]) -> str:
    """What tuning chose for each configuration of one table, on one line ('' where nothing was tuned)."""
    from harness.studies import fmt_params

    chosen: dict[str, str] = {}
    for r in runs:
        if (t := r.config.get("tuning")) and r.status == "ok":
            params = fmt_params(t["best_params"])
            chosen.setdefault(f"{r.method}/{r.variant}", f"{params} ({t['trials']} trials)")
    return "tuned on the validation split: " + " · ".join(f"{k} {v}" for k, v in chosen.items()) if chosen else ""


MEASURED_HEAD = ("method", "seed", "trainable", "peak", "estimate", "step", "tokens/s", "MFU")


def measured_only_tables(records: list[RunRecord], title: str = "") -> list:
    """Runs with nothing to score (random weights, the synthetic task): memory and speed per run, the estimate's
    peak beside the measured one, and the reason in the title, so no figure reads as an accuracy."""
    from collections import defaultdict

    from rich import box
    from rich.markup import escape
    from rich.table import Table

    from reports.metrics import peak_bytes

    by: dict[tuple[str, str], list[RunRecord]] = defaultdict(list)
    for r in records:
        if r.status == "ok" and r.measured_only:
            by[(r.model, r.task)].append(r)
    out = []
    for (model, task), runs in by.items():
        what = peak_bytes(runs[0])[1]
        caption = f"{model} · {task} · {runs[0].measured_only} · peak: {what}"
        table = Table(
            title=escape(" · ".join(x for x in (title, caption) if x)), box=box.SIMPLE_HEAD, title_justify="left"
        )
        for i, h in enumerate(MEASURED_HEAD):
            table.add_column(h, justify="left" if i == 0 else "right", no_wrap=True)
        for r in runs:
            step = (
                statistics.median(r.training.step_times_s[r.training.timing_warmup_steps :] or r.training.step_times_s)
                if r.training.step_times_s
                else 0
            )
            est = (r.estimate or {}).get("peak_bytes")
            row = [
                f"{r.method}/{r.variant}".removesuffix("/default"),
                str(r.seed),
                fmt_pct(r.trainable_pct),
                _size(peak_bytes(r)[0] or 0),
                _size(est) if est else "—",
                f"{step * 1000:.0f} ms" + (" ⚠" if stats.under_load(r) else "") if step else "—",
                f"{r.training.tokens_per_s:,.0f}" if r.training.tokens_per_s else "—",
                f"{r.mfu:.1%}" if r.mfu is not None else "—",
            ]
            table.add_row(*(escape(x) for x in row))
        out.append(table)
    return out


def print_summary(records: list[RunRecord], title: str, wide: bool = False):
    """The compact tables, or with ``wide`` the table of every column (reports/summary.py). Returns the console
    it printed on."""
    if wide:
        from reports.summary import console as wide_console
        from reports.summary import to_rich_table

        out = wide_console()
        out.print(to_rich_table(records, title=title))
        return out
    out = console()
    for part in tables(records, title):
        out.print(part)
    return out
