"""Command line: ``ftbench run | methods | models | tasks | summary | report | compare | estimate``.

User errors (bad suite, unknown names, unusable paths) print one line and exit with code 2, no traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import sys
from pathlib import Path

from harness.driver.cli_facts import cmd_estimate, cmd_methods, cmd_models, cmd_tasks
from harness.driver.cli_results import OutputError, cmd_compare, cmd_report, cmd_summary, writing
from harness.libs import environment_kept, quiet_libraries
from harness.progress import interrupted_before_work, interrupts_raise
from harness.schema import ConfigError

EXIT_USER_ERROR = 2
EXIT_OUTPUT_ERROR = 1  # the runs are fine (their records are whole); what could not be written is named


def _results_dir(arg: str | None, suite_name: str) -> Path:
    path = Path(arg) if arg else Path("results") / suite_name
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--results {path}: exists and is not a directory")
    probe = path if path.exists() else next((p for p in path.parents if p.exists()), Path("."))
    if not os.access(probe, os.W_OK):
        raise ConfigError(f"--results {path}: {probe} is not writable")
    return path


OFFLINE = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")


def _offline_unless_the_suite_allows(data) -> bool:
    """Offline for this whole process (validation reads configs of cached hub ids too) unless the suite says
    ``allow_network: true``. Set before transformers is imported: the hub library reads it at import time.
    Returns whether the suite allows the network."""
    allowed = isinstance(data, dict) and data.get("allow_network") is True
    if not allowed:
        os.environ.update(dict.fromkeys(OFFLINE, "1"))
    return allowed


def cmd_run(args: argparse.Namespace) -> int:
    """Cheap checks first (schema, names, configs, data, results dir: no torch), then the model-skeleton checks."""
    from harness.driver import forkserver, torchside
    from harness.driver.suite import check_cheap, read_suite_file

    data = read_suite_file(args.suite)  # not a file, too large, not YAML: one line, before anything starts
    network = _offline_unless_the_suite_allows(data)
    dry = getattr(args, "dry_run", False)
    if args.executor == "local" and forkserver.enabled() and not dry:  # its imports overlap the cheap checks
        forkserver.server_for(allow_network=network)
    try:
        suite = check_cheap(data, args.suite)
        results = _results_dir(args.results, suite.name)
        if args.executor == "ray" and importlib.util.find_spec("ray") is None:
            raise ConfigError("--executor ray needs Ray: pip install 'ftbench[ray]'")
        from harness.driver.runner import ResultsLocked, check_unlocked

        try:
            check_unlocked(results)  # another runner: refused now, not after the imports below
        except ResultsLocked as err:
            raise ConfigError(str(err)) from None
        suite = _with_options(suite, args)
        with environment_kept():  # what torch and friends set while the checks run stays out of the cells
            # in a fork of the zygote just started (it imports torch anyway), not here (harness/driver/torchside.py)
            torchside.call(
                "harness.driver.suite:check_fit_sent",
                suite.allow_network,
                suite_json=suite.model_dump_json(),
                source=args.suite,
            )
        _check_device(suite.device)
        if dry:  # the plan: every check above, then estimates only; nothing runs and nothing is written
            from harness.driver.dryrun import print_plan
            from harness.driver.runner import select_cells
            from harness.driver.suite import expand

            return print_plan(suite, select_cells(expand(suite), args.only) if args.only else expand(suite))
        return _run(args, suite, results)
    finally:
        forkserver.close_all()


def _with_options(suite, args: argparse.Namespace):
    """--device, --only and --jobs checked (one line, exit 2) and applied: the device to the suite (it is part of
    each cell), the other two to the run only."""
    from harness.driver.runner import select_cells
    from harness.driver.suite import expand
    from harness.schema import DEVICE_PATTERN, Suite

    if args.device is not None:
        import re

        if not re.match(DEVICE_PATTERN, args.device):
            raise ConfigError(f"--device {args.device}: allowed: cpu, cuda, cuda:N")
        suite = Suite.model_validate({**suite.model_dump(), "device": args.device})
    if args.only:
        if suite.tune is not None:
            raise ConfigError("--only: not with a tune: block yet (a study serves every seed of a method); drop one")
        if not select_cells(expand(suite), args.only):
            from harness.driver.runner import cell_key

            keys = sorted({cell_key(c) for c in expand(suite)})
            more = f", … ({len(keys)} in all)" if len(keys) > 6 else ""
            raise ConfigError(f"--only {' '.join(args.only)}: matches no cell; cells are {', '.join(keys[:6])}{more}")
    cores = os.cpu_count() or 1
    if not 1 <= args.jobs <= cores:
        raise ConfigError(f"--jobs {args.jobs}: allowed: 1 to {cores} (this machine's cores)")
    if args.jobs > 1 and args.executor == "ray":
        raise ConfigError("--jobs: for the local executor; on Ray, cells run side by side by num_cpus")
    return suite


def _check_device(device: str | None) -> None:
    """A CUDA device torch cannot see is a user error now, not a failed record per cell."""
    if not device or device == "cpu":
        return
    import torch

    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    index = int(device.partition(":")[2] or 0)
    if index >= n:
        have = f"{n} CUDA device(s), cuda:0 to cuda:{n - 1}" if n else f"no CUDA device (torch {torch.__version__})"
        raise ConfigError(f"--device {device}: this machine has {have}")


def _run(args: argparse.Namespace, suite, results: Path) -> int:
    from harness.driver.runner import ResultsLocked, run_suite
    from harness.driver.tune import StorageUnreachable, with_command_line

    if args.command == "tune" and suite.tune is None:
        raise ConfigError(f"{args.suite}: no tune: block; `ftbench tune` needs one (see docs/tuning.md)")
    if suite.tune is not None or getattr(args, "trials", None) is not None or getattr(args, "storage", None):
        try:
            suite = with_command_line(suite, args.suite, getattr(args, "trials", None), getattr(args, "storage", None))
        except (ValueError, StorageUnreachable) as err:  # a storage that cannot be opened: before anything runs
            raise ConfigError(str(err)) from None
    try:  # a tune: block's trials run first, under the same lock (harness/driver/runner.py)
        text = Path(args.suite).read_text()
        kw = dict(retry_failed=args.retry_failed, executor=args.executor, address=args.address)
        kw.update(only=args.only, jobs=args.jobs)
        records = run_suite(suite, text, results, **kw)
    except (ResultsLocked, StorageUnreachable) as err:
        raise ConfigError(str(err)) from None
    from reports.terminal import print_summary

    out = print_summary(records, f"ftbench · {suite.name}", args.wide)
    out.print(f"records: {results / 'records'}")
    if any(e.bytes_on_disk for r in records for e in r.exports):
        out.print(
            f"exports: {results / 'exports'} (each folder's README.md: how to load it, its accuracy as served)",
            soft_wrap=True,
        )
    from reports.html import write_report

    with writing(str(results / "report.html")):
        out.print(f"report: {write_report(results)}")
    return 0 if all(r.status == "ok" for r in records) else 1


def _shipped(relative: str) -> Path:
    """A file of the ftbench tree (``suites/claims.yaml``): in this folder where it has one, else beside the
    installed ``harness`` package (the source tree of an editable install), so the command works from anywhere."""
    here = Path(relative)
    if here.exists():
        return here
    import harness

    beside = Path(harness.__file__).resolve().parents[1] / relative
    return beside if beside.exists() else here


def cmd_claims(args: argparse.Namespace) -> int:
    """The papers' claims: run suites/claims.yaml (resuming), measure, print and write the verdict table."""
    from harness.driver.claims import run_claims
    from harness.driver.runner import ResultsLocked
    from harness.driver.suite import load_suite

    results = _results_dir(args.results, "claims")
    suite = args.suite or str(_shipped("suites/claims.yaml"))
    if not args.suite and not Path(suite).exists():  # installed from a wheel: the suites stay in the source tree
        raise ConfigError("suites/claims.yaml: not installed with ftbench; run in a clone of ftbench, or --suite FILE")
    try:  # stdout is the verdict table: a library's import banner (gptqmodel, through peft) goes to stderr
        with contextlib.redirect_stdout(sys.stderr):
            load_suite(suite)  # a bad suite is one line, before anything runs
            page, md = run_claims(suite, results, run=not args.no_run, say=lambda s: print(s, file=sys.stderr))
    except ResultsLocked as err:
        raise ConfigError(str(err)) from None
    print(md)
    print(f"claims: {page}")
    return 0


def cmd_cell(args: argparse.Namespace) -> int:
    """Internal: run one cell (the runner starts this in a subprocess)."""
    from harness.cell.run import run_cell_file

    return run_cell_file(Path(args.cell_file), Path(args.results))


def build_parser() -> argparse.ArgumentParser:
    """The ``ftbench`` argument parser: the public commands, then the internal ones without help."""
    p = argparse.ArgumentParser(prog="ftbench", description="Compare fine-tuning methods on one model and task.")
    p.add_argument("--version", action="version", version=f"ftbench {_version()}")
    public = "run,tune,methods,models,tasks,summary,report,compare,claims,estimate"
    sub = p.add_subparsers(dest="command", required=True, metavar="{" + public + "}")
    r = sub.add_parser("run", help="run a suite (resumes: cells with a record are skipped)")
    _run_options(r, tune=False)
    t = sub.add_parser("tune", help="run a suite with a tune: block (tune each method on validation, then run)")
    t.add_argument("--trials", type=int, help="trials per method (overrides tune.trials)")
    _run_options(t, tune=True)
    me = sub.add_parser("methods", help="list methods with their config fields (or one: ftbench methods qalora)")
    me.add_argument("name", nargs="?", help="one method's name")
    me.set_defaults(fn=cmd_methods)
    sub.add_parser("models", help="list model aliases").set_defaults(fn=cmd_models)
    sub.add_parser("tasks", help="list tasks").set_defaults(fn=cmd_tasks)
    s = sub.add_parser("summary", help="print the summary table of a results directory")
    s.add_argument("results", help="a results directory (results/<suite name>)")
    s.set_defaults(fn=cmd_summary)
    rp = sub.add_parser("report", help="write the HTML report of a results directory (or md / csv / json)")
    rp.add_argument("results", help="a results directory (results/<suite name>)")
    rp.add_argument("-o", "--output", help="output file (default: RESULTS/report.html; stdout for md/csv/json)")
    rp.add_argument(
        "--format",
        choices=["html", "md", "csv", "json"],
        default="html",
        help="html (default): the self-contained page; md, csv, json: the tables (on stdout unless -o)",
    )
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
    cp.add_argument("old", help="the baseline: a results directory")
    cp.add_argument("new", help="the results directory judged against it")
    cp.add_argument("--format", choices=["md", "csv", "json"], default="md", help="md (default): the pivoted table")
    cp.set_defaults(fn=cmd_compare)
    c = sub.add_parser("claims", help="the papers' claims reproduced in miniature, with verdicts")
    c.add_argument(
        "--suite", help="the claims suite (default: suites/claims.yaml here, else the one ftbench was installed from)"
    )
    c.add_argument("--results", help="results directory (default: results/claims)")
    c.add_argument("--no-run", action="store_true", help="judge the records already there; run nothing")
    c.set_defaults(fn=cmd_claims)
    e = sub.add_parser("estimate", help="analytic peak-memory estimate for models that do not fit here")
    e.add_argument(
        "--model",
        action="append",
        help="a preset (llama-7b, llama-13b, llama-33b, llama-65b, llama-70b, gpt3-175b), an ftbench model "
        "(smollm2-135m, minilm-l6, a local folder or its config.json) or shape:hidden=H,intermediate=F,layers=L,"
        "heads=A,vocab=V[,kv_heads=K]; repeat for several",
    )
    e.add_argument(
        "--method", action="append", help="a method that states a memory model (repeatable; default: every one)"
    )
    e.add_argument("--r", type=int, default=16, help="adapter rank of the LoRA family (default 16)")
    e.add_argument("--batch", type=int, default=1, help="sequences per step (default 1)")
    e.add_argument("--seq-len", type=int, default=512, help="tokens per sequence (default 512)")
    e.add_argument(
        "--grad-checkpointing", action="store_true", help="keep only each block's input for backward, recompute"
    )
    e.add_argument(
        "--optimizer",
        default="adamw",
        choices=["adamw", "adamw_8bit", "paged_adamw_32bit", "paged_adamw_8bit"],
        help="optimizer state per trained parameter (default adamw: two fp32 moments)",
    )
    e.add_argument("--no-double-quant", action="store_true", help="qlora: fp32 block scales, not 8-bit ones")
    e.add_argument("--bits", type=int, default=4, choices=[2, 3, 4, 8], help="qalora: integer bits (default 4)")
    e.add_argument(
        "--group-size", type=int, default=32, choices=[16, 32, 64, 128], help="qalora: group size (default 32)"
    )
    e.add_argument(
        "--attention", default="sdpa", choices=["sdpa", "eager", "math"], help="attention kernel (default sdpa)"
    )
    e.add_argument(
        "--weights", default="bf16", choices=["bf16", "fp32"], help="the weights' dtype (default bf16, as the papers "
        "train; fp32 under bf16 autocast is how ftbench runs train: ftbench run SUITE --dry-run has each cell's)",
    )  # fmt: skip
    e.set_defaults(fn=cmd_estimate)
    # internal commands (the fork server, a cell): added without help, so --help never lists them
    z = sub.add_parser("_zygote")
    z.set_defaults(fn=lambda args: importlib.import_module("harness.driver.forkserver").serve())
    c = sub.add_parser("_cell")
    c.add_argument("cell_file")
    c.add_argument("--results", required=True)
    c.set_defaults(fn=cmd_cell)
    return p


def _run_options(p: argparse.ArgumentParser, tune: bool) -> None:
    """What `run` and `tune` both take: the suite, where results go, which cells, where and how they run."""
    p.add_argument("suite", help="suite YAML file" + (" with a tune: block" if tune else ""))
    p.add_argument("--results", help="results directory (default: results/<suite name>)")
    p.add_argument("--retry-failed", action="store_true", help="rerun cells whose record is not ok")
    p.add_argument("--executor", choices=["local", "ray"], default="local", help="where cells run (default local)")
    p.add_argument("--address", help="Ray cluster address (default: start a local one)")
    p.add_argument("--storage", help="database URL for the studies (overrides tune.storage), e.g. postgresql://…")
    p.set_defaults(fn=cmd_run)
    p.add_argument(
        "--only",
        action="append",
        metavar="PATTERN",
        help="run only cells whose model/task/method/variant/seed matches (glob, whole or a run of parts: lora, "
        "lora/r8, '*/0'); repeatable. The summary and report still show every recorded cell",
    )
    p.add_argument("--device", help="cpu | cuda | cuda:N (overrides the suite's device:; default cuda if present)")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="validate, write nothing, and list the cells with their estimated peak memory by category, whether "
        "it fits this machine, and an estimated time",
    )
    p.add_argument(
        "--jobs",
        type=int,
        default=1,
        metavar="N",
        help="cells side by side, the cores split between them; their timings are flagged as under load",
    )


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ftbench")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "(not installed)"


def main(argv: list[str] | None = None) -> int:
    """Run one ``ftbench`` command; user errors are one line and exit code 2, never a traceback."""
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
    except BrokenPipeError:  # `ftbench report … | head`: the reader has gone; that is not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit's flush cannot fail again
        return 141
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
    import threading

    if "torch" in sys.modules and threading.active_count() == 1:
        # Everything is written. Python's own teardown of torch, transformers & co. would take another 1.2 s
        # (2-core Xeon) and free nothing: the exit handlers run (logging, libraries' own), then the process ends
        # as the zygote does (harness/driver/forkserver.py).
        import atexit

        atexit._run_exitfuncs()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError):  # a reader that left early (`| head`): nothing more to say
                stream.flush()
        os._exit(rc if isinstance(rc, int) else 1)
    sys.exit(rc)
