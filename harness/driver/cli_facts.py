"""The commands that print static facts — ``ftbench methods | models | tasks | estimate`` — each importing only
what it lists (no torch for models and tasks)."""

from __future__ import annotations

import argparse

from harness.schema import ConfigError


def cmd_methods(args: argparse.Namespace) -> int:
    """``ftbench methods [NAME]``: each method (or one) with its config fields, types and defaults."""
    from rich.markup import escape
    from rich.table import Table

    from harness.registry import available_methods, broken_plugins, describe_config
    from reports.terminal import console as make_console

    console = make_console()  # piped into a file: 100 columns, not rich's 80
    known, broken = available_methods(), broken_plugins()
    if args.name in broken:
        raise ConfigError(f"methods {args.name}: {broken[args.name]}")
    if args.name and args.name not in known:
        raise ConfigError(f"methods {args.name}: unknown method; allowed: {', '.join(known)}")
    for name, cls in known.items():
        if args.name and name != args.name:
            continue
        table = Table(
            title=f"{name} — {(cls.__doc__ or '').strip().splitlines()[0] if cls.__doc__ else ''}", title_justify="left"
        )
        for col in ("field", "type", "default", "help"):
            table.add_column(col, overflow="fold")
        for row in describe_config(cls.Config):
            table.add_row(*(escape(str(row[c])) for c in ("field", "type", "default", "help")))
        console.print(table)
    for name, why in broken.items() if not args.name else ():
        console.print(f"[yellow]warning:[/] method {escape(name)} is not available: {escape(why)}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    """``ftbench models``: the model aliases, and what else a suite may name."""
    from harness.cell.modelnames import ALIASES

    width = max(map(len, ALIASES))  # the columns line up whatever the longest alias
    for k, v in ALIASES.items():
        print(f"{k:{width}s}  {v}")
    print(
        "(or any local path / cached hub id transformers loads: a decoder (causal LM) reads every task through "
        "prompts, an encoder gets a classification head; `mode:` in the suite overrides)"
    )
    return 0


def cmd_tasks(args: argparse.Namespace) -> int:
    """``ftbench tasks``: the registered tasks with their kind and source, and the generic ones."""
    from harness.tasks.builtin import TASKS, task_kind

    # the docstring's first paragraph, whole: the source of the data is in it
    rows = [(k, task_kind(k), " ".join((fn.__doc__ or "").strip().split("\n\n")[0].split())) for k, fn in TASKS.items()]
    rows += [
        ("csv / jsonl", "classification", "your file: {name: csv, path: data.csv, columns: {text: ..., label: ...}}"),
        ("", "multiple_choice", "kind: multiple_choice, columns: {text: ..., choices: ..., label: <the right one>}"),
        ("", "generation", "kind: generation, columns: {text: ..., answer: ...}"),
        ("hf", "any", "a hub dataset: {name: hf, dataset: <name>, columns: ...} (needs allow_network: true)"),
    ]
    name_w, kind_w = (max(len(r[i]) for r in rows) for i in (0, 1))
    for k, kind, text in rows:
        print(f"{k:{name_w}s}  {kind:{kind_w}s}  {text}")
    return 0


def cmd_estimate(args: argparse.Namespace) -> int:
    """Analytic peak memory for models this machine cannot hold (harness/measure/estimate.py has the formulas).
    Every argument is checked, and every model resolved, before the table is printed."""
    from harness.measure.estimate import print_table

    print_table(args)
    return 0
