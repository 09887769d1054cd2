"""Command line: ``ftbench run | methods | models | tasks | summary | report | compare | estimate``.

User errors (bad suite, unknown names, unusable paths) print one line and exit with code 2, no traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import importlib.util
import os
import sys
from pathlib import Path

from harness.libs import quiet_libraries
from harness.progress import interrupted_before_work, interrupts_raise
from harness.schema import ConfigError

EXIT_USER_ERROR = 2
EXIT_OUTPUT_ERROR = 1  # the runs are fine (their records are whole); what could not be written is named


class OutputError(Exception):
    """A file ftbench had to write could not be (disk full, read-only): one line, the path and the errno."""


@contextlib.contextmanager
def writing(what: str):
    try:
        yield
    except OSError as err:
        code = errno.errorcode.get(err.errno or 0, "?")
        where = err.filename or what
        raise OutputError(f"cannot write {where}: {err.strerror or err} ({code})") from None


def _warn(problems: list[str]) -> None:
    for p in problems:
        print(f"warning: {p}", file=sys.stderr)


def _results_dir(arg: str | None, suite_name: str) -> Path:
    path = Path(arg) if arg else Path("results") / suite_name
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--results {path}: exists and is not a directory")
    probe = path if path.exists() else next((p for p in path.parents if p.exists()), Path("."))
    if not os.access(probe, os.W_OK):
        raise ConfigError(f"--results {path}: {probe} is not writable")
    return path


OFFLINE = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")


def _offline_unless_the_suite_allows(path: str) -> None:
    """Offline for this whole process (validation reads configs of cached hub ids too) unless the suite says
    ``allow_network: true``. Set before transformers is imported: the hub library reads it at import time."""
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError, RecursionError):
        data = None  # load_suite says what is wrong with the file, in one line
    if not (isinstance(data, dict) and data.get("allow_network") is True):
        os.environ.update(dict.fromkeys(OFFLINE, "1"))


def cmd_run(args: argparse.Namespace) -> int:
    """Cheap checks first (schema, names, configs, data, results dir: no torch), then the model-skeleton checks."""
    _offline_unless_the_suite_allows(args.suite)
    from harness import forkserver
    from harness.suite import check_cheap, check_fit, read_suite_file

    if args.executor == "local" and forkserver.enabled():  # its imports (seconds) overlap the checks below
        forkserver.server_for(allow_network=False)
    try:
        suite = check_cheap(read_suite_file(args.suite), args.suite)
        results = _results_dir(args.results, suite.name)
        if args.executor == "ray" and importlib.util.find_spec("ray") is None:
            raise ConfigError("--executor ray needs Ray: pip install 'ftbench[ray]'")
        from harness.runner import ResultsLocked, check_unlocked

        try:
            check_unlocked(results)  # another runner: refused now, not after the imports below
        except ResultsLocked as err:
            raise ConfigError(str(err)) from None
        check_fit(suite, args.suite)
        return _run(args, suite, results)
    finally:
        forkserver.close_all()


def _run(args: argparse.Namespace, suite, results: Path) -> int:
    from harness.runner import ResultsLocked, run_suite

    cells = None
    if args.command == "tune" and suite.tune is None:
        raise ConfigError(f"{args.suite}: no tune: block; `ftbench tune` needs one (see README: Fair comparisons)")
    if suite.tune is not None or getattr(args, "trials", None) is not None or getattr(args, "storage", None):
        from harness.runner import tuned_cells
        from harness.tune import StorageUnreachable, with_command_line

        try:
            suite = with_command_line(suite, args.suite, getattr(args, "trials", None), getattr(args, "storage", None))
            cells = tuned_cells(suite, results, executor=args.executor, address=args.address)
        except (ValueError, ResultsLocked, StorageUnreachable) as err:
            raise ConfigError(str(err)) from None
    try:
        text = Path(args.suite).read_text()
        kw = dict(retry_failed=args.retry_failed, executor=args.executor, address=args.address, cells=cells)
        records = run_suite(suite, text, results, **kw)
    except ResultsLocked as err:
        raise ConfigError(str(err)) from None
    from reports.terminal import print_summary

    out = print_summary(records, f"ftbench · {suite.name}", args.wide)
    out.print(f"records: {results / 'records'}")
    from reports.html import write_report

    with writing(str(results / "report.html")):
        out.print(f"report: {write_report(results)}")
    return 0 if all(r.status == "ok" for r in records) else 1


def cmd_methods(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from harness.registry import available_methods, describe_config

    console = Console()
    for name, cls in available_methods().items():
        table = Table(
            title=f"{name} — {(cls.__doc__ or '').strip().splitlines()[0] if cls.__doc__ else ''}", title_justify="left"
        )
        for col in ("field", "type", "default", "help"):
            table.add_column(col, overflow="fold")
        for row in describe_config(cls.Config):
            table.add_row(*(escape(str(row[c])) for c in ("field", "type", "default", "help")))
        console.print(table)
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from harness.models import ALIASES

    for k, v in ALIASES.items():
        print(f"{k:12s} {v}")
    print(
        "(or any local path / cached hub id transformers loads: a decoder (causal LM) reads every task through "
        "prompts, an encoder gets a classification head; `mode:` in the suite overrides)"
    )
    return 0


def cmd_tasks(args: argparse.Namespace) -> int:
    from harness.tasks import TASKS, task_kind

    for k, fn in TASKS.items():
        print(f"{k:16s} {task_kind(k):16s} {(fn.__doc__ or '').strip().splitlines()[0]}")
    generic = [
        ("csv / jsonl", "classification", "your file: {name: csv, path: data.csv, columns: {text: ..., label: ...}}"),
        ("", "multiple_choice", "kind: multiple_choice, columns: {text: ..., choices: ..., label: <the right one>}"),
        ("", "generation", "kind: generation, columns: {text: ..., answer: ...}"),
        ("hf", "any", "a hub dataset: {name: hf, dataset: <name>, columns: ...} (needs allow_network: true)"),
    ]
    for k, kind, text in generic:
        print(f"{k:16s} {kind:16s} {text}")
    return 0


def _records_dir(path: str) -> Path:
    if not (Path(path) / "records").is_dir():
        raise ConfigError(f"{path}: no records/ folder; is this an ftbench results directory?")
    return Path(path)


def cmd_report(args: argparse.Namespace) -> int:
    """HTML by default (self-contained); md / csv / json print the summary table to stdout."""
    from reports.html import load_results, write_report

    results = _records_dir(args.results)
    res = load_results(results)
    _warn(res.problems)
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

    import pandas as pd

    from reports.compare import flat_rows
    from reports.summary import to_markdown

    if fmt == "md":
        from reports.deployment import to_markdown as deployment_markdown

        return "\n\n".join(x for x in (to_markdown(records), deployment_markdown(records)) if x)
    rows = flat_rows(records)
    return pd.DataFrame(rows).to_csv(index=False) if fmt == "csv" else json.dumps(rows, indent=1)


def cmd_summary(args: argparse.Namespace) -> int:
    from reports.html import load_results
    from reports.terminal import print_summary

    res = load_results(_records_dir(args.results))
    _warn(res.problems)
    print_summary(res.records, f"ftbench · {res.name}", args.wide)
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    """One row per cell, old → new per metric, better / worse only beyond noise; every warning (config, commit,
    dirty tree, threads, versions, hardware) in the output itself. csv / json: the raw long rows."""
    import json

    import pandas as pd

    from reports.compare import compare, pivot
    from reports.html import load_results

    old_res, new_res = load_results(_records_dir(args.old)), load_results(_records_dir(args.new))
    _warn(old_res.problems + new_res.problems)
    old, new = old_res.records, new_res.records
    if args.format == "md":
        print(f"ftbench compare: OLD {args.old} → NEW {args.new}\n")
        print(pivot(old, new))
        return 0
    rows, notes = compare(old, new)
    if args.format == "csv":
        print("".join(f"# {n}\n" for n in notes) + pd.DataFrame(rows).to_csv(index=False), end="")
    else:
        print(json.dumps({"warnings": notes, "rows": rows}, indent=1))
    return 0


def cmd_claims(args: argparse.Namespace) -> int:
    """The papers' claims: run suites/claims.yaml (resuming), measure, print and write the verdict table."""
    from harness.claims import run_claims
    from harness.runner import ResultsLocked
    from harness.suite import load_suite

    results = _results_dir(args.results, "claims")
    try:  # stdout is the verdict table: a library's import banner (gptqmodel, through peft) goes to stderr
        with contextlib.redirect_stdout(sys.stderr):
            load_suite(args.suite)  # a bad suite is one line, before anything runs
            page, md = run_claims(args.suite, results, run=not args.no_run, say=lambda s: print(s, file=sys.stderr))
    except ResultsLocked as err:
        raise ConfigError(str(err)) from None
    print(md)
    print(f"claims: {page}")
    return 0


def cmd_estimate(args: argparse.Namespace) -> int:
    """Analytic peak memory for models this machine cannot hold (see harness/estimate.py for the formulas)."""
    from harness.estimate import ARCHS, print_table

    unknown = [n for n in args.model or [] if n not in ARCHS]
    if unknown:
        raise ConfigError(f"--model {unknown[0]!r}: unknown; allowed: {', '.join(ARCHS)}")
    print_table(args)
    return 0


def cmd_cell(args: argparse.Namespace) -> int:
    """Internal: run one cell (the runner starts this in a subprocess)."""
    from harness.cell import run_cell_file

    return run_cell_file(Path(args.cell_file), Path(args.results))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ftbench", description="Compare fine-tuning methods on one model and task.")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run a suite (resumes: cells with a record are skipped)")
    r.add_argument("suite", help="suite YAML file")
    r.add_argument("--results", help="results directory (default: results/<suite name>)")
    r.add_argument("--retry-failed", action="store_true", help="rerun cells whose record is not ok")
    r.add_argument("--executor", choices=["local", "ray"], default="local", help="where cells run (default local)")
    r.add_argument("--address", help="Ray cluster address (default: start a local one)")
    r.add_argument("--storage", help="database URL for a tune: block's studies (overrides tune.storage)")
    r.set_defaults(fn=cmd_run)
    t = sub.add_parser("tune", help="run a suite with a tune: block (tune each method on validation, then run)")
    t.add_argument("suite", help="suite YAML file with a tune: block")
    t.add_argument("--results", help="results directory (default: results/<suite name>)")
    t.add_argument("--trials", type=int, help="trials per method (overrides tune.trials)")
    t.add_argument("--retry-failed", action="store_true", help="rerun final cells whose record is not ok")
    t.add_argument("--executor", choices=["local", "ray"], default="local", help="where trials and cells run")
    t.add_argument("--address", help="Ray cluster address (default: start a local one)")
    t.add_argument("--storage", help="database URL for the studies (overrides tune.storage), e.g. postgresql://…")
    t.set_defaults(fn=cmd_run)
    sub.add_parser("methods", help="list methods with their config fields").set_defaults(fn=cmd_methods)
    sub.add_parser("models", help="list model aliases").set_defaults(fn=cmd_models)
    sub.add_parser("tasks", help="list tasks").set_defaults(fn=cmd_tasks)
    s = sub.add_parser("summary", help="print the summary table of a results directory")
    s.add_argument("results")
    s.set_defaults(fn=cmd_summary)
    rp = sub.add_parser("report", help="write the HTML report of a results directory (or md / csv / json)")
    rp.add_argument("results")
    rp.add_argument("-o", "--output", help="output file (default: RESULTS/report.html; stdout for md/csv/json)")
    rp.add_argument("--format", choices=["html", "md", "csv", "json"], default="html")
    rp.add_argument(
        "--plotly",
        choices=["embed", "cdn"],
        default="embed",
        help="embed plotly.js (default: the page opens offline) or reference its CDN (a much smaller file)",
    )
    rp.set_defaults(fn=cmd_report)
    for sp in (r, t, s):
        sp.add_argument("--wide", action="store_true", help="the summary with every column (default: compact)")
    cp = sub.add_parser("compare", help="compare two results directories cell by cell")
    cp.add_argument("old")
    cp.add_argument("new")
    cp.add_argument("--format", choices=["md", "csv", "json"], default="md", help="md (default): the pivoted table")
    cp.set_defaults(fn=cmd_compare)
    c = sub.add_parser("claims", help="the papers' claims reproduced in miniature, with verdicts")
    c.add_argument("--suite", default="suites/claims.yaml", help="the claims suite (default suites/claims.yaml)")
    c.add_argument("--results", help="results directory (default: results/claims)")
    c.add_argument("--no-run", action="store_true", help="judge the records already there; run nothing")
    c.set_defaults(fn=cmd_claims)
    e = sub.add_parser("estimate", help="analytic peak-memory estimate for models that do not fit here")
    e.add_argument("--model", action="append", help="llama-7b, llama-13b, llama-33b, llama-65b, llama-70b, gpt3-175b")
    e.add_argument("--method", action="append", choices=["full", "lora", "qlora", "qalora"])
    e.add_argument("--r", type=int, default=16)
    e.add_argument("--batch", type=int, default=1)
    e.add_argument("--seq-len", type=int, default=512)
    e.add_argument("--grad-checkpointing", action="store_true")
    e.add_argument(
        "--optimizer", default="adamw", choices=["adamw", "adamw_8bit", "paged_adamw_32bit", "paged_adamw_8bit"]
    )
    e.add_argument("--no-double-quant", action="store_true")
    e.add_argument("--bits", type=int, default=4, choices=[2, 3, 4, 8])
    e.add_argument("--group-size", type=int, default=32, choices=[16, 32, 64, 128])
    e.add_argument("--attention", default="sdpa", choices=["sdpa", "eager"])
    e.set_defaults(fn=cmd_estimate)
    z = sub.add_parser("_zygote", help=argparse.SUPPRESS)
    z.set_defaults(fn=lambda args: __import__("harness.forkserver").forkserver.serve())
    c = sub.add_parser("_cell", help=argparse.SUPPRESS)
    c.add_argument("cell_file")
    c.add_argument("--results", required=True)
    c.set_defaults(fn=cmd_cell)
    return p


def main(argv: list[str] | None = None) -> int:
    quiet_libraries()
    args = build_parser().parse_args(argv)
    if args.command != "run":  # no other command needs the hub; `run` decides from its suite
        os.environ.update(dict.fromkeys(OFFLINE, "1"))
        interrupts_raise()
    try:
        return args.fn(args)
    except ConfigError as err:
        print(f"ftbench: error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except OutputError as err:
        print(f"ftbench: error: {err}", file=sys.stderr)
        return EXIT_OUTPUT_ERROR
    except Exception as err:  # noqa: BLE001 - a bug or an input nothing foresaw: one line, not a traceback
        if os.environ.get("FTBENCH_DEBUG") == "1":
            raise
        line = str(err).strip().splitlines()[0][:300] if str(err).strip() else ""
        print(f"ftbench: error: {type(err).__name__}: {line} (FTBENCH_DEBUG=1 shows the traceback)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("ftbench: interrupted; finished runs are recorded, `ftbench run` again resumes", file=sys.stderr)
        return 130


def entry() -> None:
    """The ``ftbench`` command. After Ctrl-C the process ends at once with 130: a library's own interrupt or
    exit handling (some re-deliver SIGINT to themselves at shutdown) must not turn the one line into a kill."""
    import signal

    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not where SIGINT is ignored (nohup)
        signal.signal(signal.SIGINT, interrupted_before_work)
    rc = main()
    if rc == 130:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)
    sys.exit(rc)
