"""Run one cell in a process of its own, with a wall-clock limit; always leave a record.

The child writes its own record; if it dies without one (killed, segfault, timeout), this writes a ``failed`` /
``timeout`` record for it. Used by the local runner (:mod:`harness.driver.runner`) and by Ray's workers
(:mod:`harness.driver.ray_executor`) alike. On CPU the process is a fork of a zygote that has already imported the
libraries (:mod:`harness.driver.forkserver`); elsewhere a fresh ``python -m harness _cell``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from harness.atomic import atomic_write_text
from harness.driver import forkserver
from harness.driver.forkserver import cell_env
from harness.progress import LogTail
from harness.records import RunRecord, make_record, now_iso, read_record, record_path, write_record
from harness.schema import RunConfig


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


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


class _Fresh:
    """A fresh ``python -m harness _cell`` process per cell (CUDA machines, memory limits, FTBENCH_FORKSERVER=0)."""

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
    """A fork of the suite's zygote (harness/driver/forkserver.py): the same isolation without re-importing torch."""

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
    ``on_progress`` gets each of the cell's progress lines (harness/progress.py), read about twice a second and
    once more after the cell's process ends."""
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
    show = on_progress or (lambda line: None)
    while (rc := run.wait(0.5)) is None:
        for line in tail.poll():
            show(line)
        if time.perf_counter() - t0 < cfg.timeout_s:
            continue
        os.killpg(run.pid, signal.SIGKILL)  # the whole group: no orphaned workers keep running
        run.wait(60)
        tail.poll()
        where = f" (last progress: {tail.latest})" if tail.latest else ""
        rec = failure_record(
            cfg, "timeout", f"run exceeded timeout_s={cfg.timeout_s:g}{where}", started, time.perf_counter() - t0
        )
        write_record(results_dir, rec)
        return rec
    for line in tail.poll():  # what the cell wrote after the last poll, so no stage goes unseen
        show(line)
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


def run_here(cfg: RunConfig, results_dir: Path, on_progress: Callable[[str], None] | None = None) -> RunRecord:
    """One cell on this machine, in a process of its own: a fork of the suite's zygote, or a fresh process where
    the cell has a memory limit (the zygote's preloaded libraries would count against it)."""
    forked = forkserver.enabled() and not cfg.memory_limit_mb
    server = forkserver.server_for(cfg.allow_network) if forked else None
    return run_cell_subprocess(cfg, results_dir, on_progress, server)
