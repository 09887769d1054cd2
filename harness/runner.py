"""Suite runner: expand the grid, run each cell in its own subprocess, record, resume, summarise.

Each cell runs in a fresh ``python -m harness _cell`` process so that one crash cannot take the suite down
and peak memory (RSS) belongs to exactly one run. The child writes its own record; if it dies without one
(killed, segfault, timeout), the parent writes a ``failed`` / ``timeout`` record for it. Cells that already
have a record are skipped (resume); ``--retry-failed`` reruns those whose status is not ``ok``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from harness import forkserver
from harness.config import RunConfig, Suite, expand
from harness.progress import LogTail
from harness.records import (
    RunRecord,
    atomic_write_text,
    make_record,
    now_iso,
    read_record,
    record_path,
    write_record,
)

CHILD_ENV = {
    "TOKENIZERS_PARALLELISM": "false",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
}


def failure_record(cfg: RunConfig, status: str, error: str, started_at: str, wall_time_s: float) -> RunRecord:
    """A record for a run that left none of its own (killed, timed out, lost with its Ray worker)."""
    return make_record(cfg, status, error, started_at, wall_time_s)


def _child_setup(memory_limit_mb: int | None) -> None:
    """In the child, before exec: die with the runner (a killed runner must not leave a run that writes its
    record behind the next runner's back), and cap the address space when the suite asks."""
    forkserver.die_with_parent()
    if memory_limit_mb:
        import resource

        limit = memory_limit_mb * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


class ResultsLocked(Exception):
    """Another runner holds the results directory."""


def lock_results(results_dir: Path):
    """An exclusive, non-blocking lock on the results dir for the whole suite; released when the process ends
    (even by SIGKILL), so a stale lock cannot outlive its runner."""
    import fcntl

    fh = open(results_dir / ".ftbench.lock", "a+")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.seek(0)
        holder = fh.read().strip() or "?"
        fh.close()
        raise ResultsLocked(
            f"{results_dir} is in use by another ftbench run (pid {holder}); wait for it to finish "
            "or use another --results directory"
        ) from None
    fh.seek(0)
    fh.truncate()
    fh.write(str(os.getpid()))
    fh.flush()
    return fh


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def cell_env(allow_network: bool) -> dict[str, str]:
    env = {**CHILD_ENV, **os.environ}
    # Offline unless the suite opts in; with the network, fail in seconds rather than hang on an unreachable hub.
    env["HF_HUB_OFFLINE"] = "0" if allow_network else "1"
    if allow_network:
        env.setdefault("HF_HUB_ETAG_TIMEOUT", "10")
        env.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "10")
    return env


class _Fresh:
    """A fresh ``python -m harness _cell`` process per cell (CUDA machines, Ray workers, FTBENCH_FORKSERVER=0)."""

    def __init__(self, cfg: RunConfig, cell_file: Path, results_dir: Path, log: Path) -> None:
        with open(log, "w") as fh:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "harness", "_cell", str(cell_file), "--results", str(results_dir)],
                stdout=fh,
                stderr=subprocess.STDOUT,
                env=cell_env(cfg.allow_network),
                start_new_session=True,
                preexec_fn=lambda: _child_setup(cfg.memory_limit_mb),
            )
        self.pid = self.proc.pid

    def wait(self, timeout: float) -> int | None:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None


class _Forked:
    """A fork of the suite's zygote (harness/forkserver.py): the same isolation without re-importing torch."""

    def __init__(self, server, cfg: RunConfig, cell_file: Path, results_dir: Path, log: Path) -> None:
        self.server = server
        self.pid = server.start(cell_file, results_dir, log)

    def wait(self, timeout: float) -> int | None:
        try:
            return self.server.wait(self.pid, timeout)
        except RuntimeError:  # the zygote is gone, and its children die with it (parent-death signal)
            return -signal.SIGKILL


def run_cell_subprocess(
    cfg: RunConfig, results_dir: Path, on_progress: Callable[[str], None] | None = None, server=None
) -> RunRecord:
    """Run one cell in a process of its own with a wall-clock limit; always returns a record (and it is on
    disk). ``server``: a fork server whose environment matches this cell's (else a fresh process).
    ``on_progress`` gets the cell's newest progress line (harness/progress.py) about twice a second."""
    cell_file = results_dir / "cells" / f"{cfg.cell_id}.json"
    atomic_write_text(cell_file, cfg.model_dump_json(indent=1))
    log = results_dir / "logs" / f"{cfg.cell_id}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    rec_path = record_path(results_dir, cfg.cell_id)
    rec_path.unlink(missing_ok=True)  # a retried cell must not leave the old record behind on a crash
    started, t0 = now_iso(), time.perf_counter()
    try:
        run = _Forked(server, cfg, cell_file, results_dir, log) if server else _Fresh(cfg, cell_file, results_dir, log)
    except RuntimeError:  # the zygote died (it says why in its exception): this cell gets a fresh process
        run = _Fresh(cfg, cell_file, results_dir, log)
    tail = LogTail(log)
    while (rc := run.wait(0.5)) is None:
        line = tail.poll()
        if line and on_progress:
            on_progress(line)
        if time.perf_counter() - t0 < cfg.timeout_s:
            continue
        os.killpg(run.pid, signal.SIGKILL)  # the whole group: no orphaned workers keep running
        run.wait(60)
        where = f" (last progress: {tail.poll()})" if tail.poll() else ""
        rec = failure_record(
            cfg, "timeout", f"run exceeded timeout_s={cfg.timeout_s:g}{where}", started, time.perf_counter() - t0
        )
        write_record(results_dir, rec)
        return rec
    if rec_path.exists():
        try:
            return read_record(rec_path)
        except ValueError as err:  # a record we cannot read is a failed run, not a crashed suite
            extra = f"its record is unreadable: {str(err).splitlines()[0]}"
            rec = failure_record(cfg, "failed", extra, started, time.perf_counter() - t0)
            write_record(results_dir, rec)
            return rec
    if rc < 0:
        sig = signal.Signals(-rc).name
        why = f"run process killed by {sig}" + (
            " (possibly the kernel's out-of-memory killer)" if sig == "SIGKILL" else ""
        )
    else:
        why = f"run process exited with code {rc} without writing a record"
    rec = failure_record(cfg, "failed", f"{why}\n{_tail(log)}".strip(), started, time.perf_counter() - t0)
    write_record(results_dir, rec)
    return rec


def pending_cells(cells: list[RunConfig], results_dir: Path, retry_failed: bool) -> list[RunConfig]:
    out = []
    for c in cells:
        p = record_path(results_dir, c.cell_id)
        if not p.exists():
            out.append(c)
        elif retry_failed:
            try:
                if read_record(p).status != "ok":
                    out.append(c)
            except ValueError:  # unreadable record: run again
                out.append(c)
    return out


def _before_cells(todo: list[RunConfig], results_dir: Path, console) -> None:
    """Hardware identity at the top of the output; one warning line for half-precision dtypes asked for
    explicitly where this machine emulates them; this machine's peak matmul rate for each dtype the cells will
    run in, before any cell (cached per machine, and the suite's figure kept on resume: harness/flops.py)."""
    from harness.cell import resolve_dtypes
    from harness.flops import mfu_dtype, peak_flops
    from harness.hardware import default_device, describe, identity, slow_note

    device = default_device()
    for server in forkserver.running():  # its imports must not load the machine while the peak is measured
        server.wait_ready()
    console.print(f"hardware: {describe(identity(device))}", soft_wrap=True)
    slow: dict[str, set[str]] = {}
    needed: set[str] = set()
    for c in todo:
        resolved_cfg, dtypes = resolve_dtypes(c, device)
        needed.add(mfu_dtype(resolved_cfg.train.dtype, resolved_cfg.method_config))
        for field, d in dtypes.items():
            note = slow_note(d["value"], device) if d["choice"] != "auto" else None
            if note:
                slow.setdefault(note, set()).add(f"{c.method}/{c.variant} {field}={d['value']}")
    for note, where in slow.items():  # one line per reason, before anything trains
        where_text = ", ".join(sorted(where))
        console.print(f"[yellow]warning:[/] {note}, yet set explicitly: {where_text}; `auto` avoids it", soft_wrap=True)
    for dtype in sorted(needed):
        peak_flops(results_dir, dtype, device)


def run_suite(
    suite: Suite,
    suite_text: str,
    results_dir: Path,
    retry_failed: bool = False,
    quiet: bool = False,
    executor: str = "local",
    address: str | None = None,
) -> list[RunRecord]:
    """Run every pending cell of ``suite``; return the records of all its cells (old and new)."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    results_dir = Path(results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    lock = lock_results(results_dir)  # held until this function returns (or the process dies)
    atomic_write_text(results_dir / "suite.yaml", suite_text)
    cells = expand(suite)
    todo = pending_cells(cells, results_dir, retry_failed)
    console = Console(stderr=True, quiet=quiet)
    if todo:
        _before_cells(todo, results_dir, console)
    skipped = len(cells) - len(todo)
    console.print(
        f"[bold]{suite.name}[/]: {len(cells)} cells, {skipped} already recorded, {len(todo)} to run → {results_dir}"
    )
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    ) as progress:
        bar = progress.add_task("", total=len(todo))

        def label(cfg: RunConfig) -> str:
            return f"{cfg.model.name} · {cfg.task.name} · {cfg.method}/{cfg.variant}"

        def done(cfg: RunConfig, rec: RunRecord) -> None:
            label = f"{cfg.model.name} · {cfg.task.name} · {cfg.method}/{cfg.variant} · seed {cfg.seed}"
            mark = "[green]ok[/]" if rec.status == "ok" else f"[red]{rec.status}[/]"
            progress.console.print(f"{mark} {label} ({rec.wall_time_s:.1f} s)")
            progress.advance(bar)

        if executor == "ray" and todo:  # a resume with nothing left to run starts no cluster
            from harness.ray_executor import run_cells_ray

            progress.update(bar, description=f"on Ray ({address or 'local cluster'})")
            run_cells_ray(todo, results_dir, address, done)
        else:
            try:
                for cfg in todo:
                    progress.update(bar, description=label(cfg))

                    def show(line: str, cfg: RunConfig = cfg) -> None:
                        progress.update(bar, description=f"{label(cfg)} · {line}")

                    # a memory limit is for the run alone: the zygote's preloaded libraries would count against it
                    forked = forkserver.enabled() and not cfg.memory_limit_mb
                    server = forkserver.server_for(cfg.allow_network) if forked else None
                    done(cfg, run_cell_subprocess(cfg, results_dir, show, server))
            finally:
                forkserver.close_all()
    records = []
    for c in cells:
        p = record_path(results_dir, c.cell_id)
        if p.exists():
            try:
                records.append(read_record(p))
            except ValueError as err:
                console.print(f"[red]unreadable record[/] {p}: {str(err).splitlines()[0]}")
    atomic_write_text(results_dir / "cells_index.json", json.dumps([c.cell_id for c in cells], indent=1))
    lock.close()
    return records
