"""Where cells run: one protocol for a suite's cells and for tuning's trials (issue 28: the run had an inline loop,
tuning a pool of its own, Ray a third path, and the fork-server choice was copied between them).

A pool takes cells (``submit`` returns at once) and hands back finished records (``next_done`` waits for any
one). :class:`LocalPool` runs them on this machine, one at a time or ``jobs`` side by side;
:class:`harness.driver.ray_executor.RayPool` runs them as Ray tasks. :func:`run_all` drives any pool.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from harness.driver.executor import run_here
from harness.records import RunRecord
from harness.schema import RunConfig

Show = Callable[[str], None]
Execute = Callable[..., RunRecord]  # execute(cfg, results_dir[, show]) -> the cell's record


class CellPool(Protocol):
    """Where cells run. ``slots``: cells in flight at once. ``submit`` returns at once; ``next_done`` waits for
    any submitted cell to end and returns its ticket and record (on disk by then); ``close`` lets go of what
    the pool holds (threads, environment) without waiting for cells in flight."""

    slots: int

    def submit(self, ticket: Any, cfg: RunConfig, results_dir: Path, show: Show | None = None) -> None: ...

    def next_done(self) -> tuple[Any, RunRecord]: ...

    def close(self) -> None: ...


class LocalPool:
    """Cells on this machine. ``jobs == 1``: one at a time, each run when its record is asked for (what a study
    proposes next may depend on every finished trial). ``jobs > 1``: that many side by side, the machine's cores
    split between them (each cell's torch threads), and every record says how many ran at once, so their
    timings are flagged as measured under load (harness/measure/runstats.py::Contention)."""

    def __init__(self, jobs: int = 1, execute: Execute = run_here) -> None:
        import inspect

        self.slots = max(1, jobs)
        self.execute = execute
        self.with_progress = len(inspect.signature(execute).parameters) >= 3  # execute(cfg, dir[, show])
        self.queue: list[tuple] = []
        self.futures: dict = {}
        self.threads = None
        self.saved_env: dict[str, str | None] = {}
        if self.slots > 1:
            from concurrent.futures import ThreadPoolExecutor

            threads = max(1, (os.cpu_count() or 1) // self.slots)
            self.saved_env = {k: os.environ.get(k) for k in ("FTBENCH_JOBS", "FTBENCH_THREADS")}
            os.environ.update(FTBENCH_JOBS=str(self.slots), FTBENCH_THREADS=str(threads))  # read by each cell
            self.threads = ThreadPoolExecutor(max_workers=self.slots, thread_name_prefix="ftbench-cell")

    def _run(self, cfg: RunConfig, results_dir: Path, show: Show | None) -> RunRecord:
        return self.execute(cfg, results_dir, show) if self.with_progress else self.execute(cfg, results_dir)

    def submit(self, ticket: Any, cfg: RunConfig, results_dir: Path, show: Show | None = None) -> None:
        if self.threads is None:
            self.queue.append((ticket, cfg, results_dir, show))
        else:
            self.futures[self.threads.submit(self._run, cfg, results_dir, show)] = ticket

    def next_done(self) -> tuple[Any, RunRecord]:
        if self.queue:
            ticket, cfg, results_dir, show = self.queue.pop(0)
            return ticket, self._run(cfg, results_dir, show)
        from concurrent.futures import FIRST_COMPLETED, wait

        finished, _ = wait(self.futures, return_when=FIRST_COMPLETED)
        future = next(iter(finished))
        # a failing run is a record; an exception here is a bug in the runner itself: raise it
        return self.futures.pop(future), future.result()

    def close(self) -> None:
        if self.threads is not None:  # never wait on Ctrl-C: the cells die with this process (parent-death signal)
            self.threads.shutdown(wait=False, cancel_futures=True)
            self.threads = None
        for k, v in self.saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        self.saved_env = {}


def make_pool(executor: str, address: str | None, jobs: int, ray_slots: int) -> CellPool:
    """The pool an ``--executor`` names: ``local`` (``jobs`` at a time) or ``ray`` (``ray_slots`` in flight)."""
    if executor == "ray":
        from harness.driver import ray_executor

        return ray_executor.RayPool(address, slots=ray_slots)
    return LocalPool(jobs)


def run_all(
    pool: CellPool,
    cells: list[RunConfig],
    results_dir: Path,
    show_for: Callable[[RunConfig], Show | None],
    done: Callable[[RunConfig, RunRecord], None],
) -> None:
    """Every cell through ``pool``, at most ``pool.slots`` in flight; ``done`` gets each record as it ends."""
    waiting, in_flight = list(enumerate(cells)), 0
    while waiting or in_flight:
        while waiting and in_flight < pool.slots:
            i, cfg = waiting.pop(0)
            pool.submit(i, cfg, results_dir, show_for(cfg))
            in_flight += 1
        i, rec = pool.next_done()
        in_flight -= 1
        done(cells[i], rec)
