"""The commands that read a results dir — ``ftbench report | summary | compare`` — and how the CLI says that an
output could not be written."""

from __future__ import annotations

import argparse
import contextlib
import errno
import sys
from pathlib import Path

from harness.schema import ConfigError


class OutputError(Exception):
    """A file ftbench had to write could not be (disk full, read-only): one line, the path and the errno."""


@contextlib.contextmanager
def writing(what: str):
    """Turn an OSError while writing ``what`` into one line naming the path and the errno."""
    try:
        yield
    except OSError as err:
        code = errno.errorcode.get(err.errno or 0, "?")
        where = err.filename or what
        raise OutputError(f"cannot write {where}: {err.strerror or err} ({code})") from None


def warn(problems: list[str]) -> None:
    """Each problem as a ``warning:`` line on stderr."""
    for p in problems:
        print(f"warning: {p}", file=sys.stderr)


def records_dir(path: str) -> Path:
    """``path`` if it holds a ``records/`` folder, else a user error."""
    if not (Path(path) / "records").is_dir():
        raise ConfigError(f"{path}: no records/ folder; is this an ftbench results directory?")
    return Path(path)


def cmd_report(args: argparse.Namespace) -> int:
    """HTML by default (self-contained); md / csv / json print the summary table to stdout."""
    from reports.html import load_results, write_report

    results = records_dir(args.results)
    res = load_results(results)
    warn(res.problems)
    if args.format == "html":
        with writing(args.output or str(results / "report.html")):
            print(write_report(results, Path(args.output) if args.output else None, args.plotly))
        return 0
    text = _tabular(res.records, args.format)
    if args.output:
        from harness.atomic import atomic_write_text

        with writing(args.output):
            atomic_write_text(Path(args.output), text)
    else:
        print(text, end="" if text.endswith("\n") else "\n")
    return 0


def _tabular(records, fmt: str) -> str:
    import json

    from reports.compare import flat_rows
    from reports.markdown import csv_text
    from reports.summary import to_markdown

    if fmt == "md":
        from reports import labels
        from reports.deployment import to_markdown as deployment_markdown
        from reports.league import to_markdown as league_markdown
        from reports.terminal import to_markdown as headline_markdown
        from reports.tuning import to_markdown as tuning_markdown

        parts = (headline_markdown(records), tuning_markdown(records), to_markdown(records))
        parts += (deployment_markdown(records),)
        parts += (league_markdown(records), labels.to_markdown(records))
        return "\n\n".join(x for x in parts if x)
    rows = flat_rows(records)
    return csv_text(rows) if fmt == "csv" else json.dumps(rows, indent=1)


def cmd_summary(args: argparse.Namespace) -> int:
    """``ftbench summary DIR``: the compact table (``--wide``: every column)."""
    from reports.html import load_results
    from reports.terminal import print_summary

    res = load_results(records_dir(args.results))
    warn(res.problems)
    print_summary(res.records, f"ftbench · {res.name}", args.wide)
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    """One row per cell, old → new per metric, better / worse only beyond noise; every warning (config, commit,
    dirty tree, threads, versions, hardware) in the output itself. csv / json: the raw long rows."""
    import json

    from reports.compare import compare, pivot
    from reports.html import load_results
    from reports.markdown import csv_text

    old_res, new_res = load_results(records_dir(args.old)), load_results(records_dir(args.new))
    warn(old_res.problems + new_res.problems)
    old, new = old_res.records, new_res.records
    if args.format == "md":
        print(f"ftbench compare: OLD {args.old} → NEW {args.new}\n")
        print(pivot(old, new))
        return 0
    rows, notes = compare(old, new)
    if args.format == "csv":
        print("".join(f"# {n}\n" for n in notes) + csv_text(rows), end="")
    else:
        print(json.dumps({"warnings": notes, "rows": rows}, indent=1))
    return 0
