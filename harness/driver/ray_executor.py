"""Run a suite's cells on a Ray cluster, one Ray task per cell.

Each task runs the cell exactly as the local executor does (:func:`harness.driver.executor.run_here`) — in a
process of its own on the worker, with the same timeout, memory limit and parent-death signal: a fork of the
worker's own zygote, started by its first cell and kept for the next, or a fresh ``python -m harness _cell``
where a GPU or a memory limit rules forking out — and returns the
record to the driver, which writes it atomically into the results dir (so resume works the same). A worker
that crashes or a node that is lost becomes a ``failed`` record for that cell (after ``retries`` reruns), and
the suite goes on. Resources per task: the suite's ``num_cpus`` and, for cells that need one, ``num_gpus=1``
(one GPU per cell: cells sharing a GPU would share its memory figures).

Exports are written on the worker: under the driver's results dir where the cluster shares that filesystem
(a local cluster does), else under the worker's temp dir; the record says where.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from harness.driver.executor import failure_record, run_here
from harness.records import RunRecord, now_iso, write_record
from harness.schema import RunConfig


def _remote_cell(cfg_json: str, results_dir: str) -> str:
    """Inside a Ray worker: run the cell in a process of its own, return its record as JSON. A worker runs many
    cells, so its zygote pays for the imports once; a fresh process per cell paid them every time."""
    cfg = RunConfig.model_validate_json(cfg_json)
    target = Path(results_dir)
    if not os.access(target if target.exists() else target.parent, os.W_OK):
        target = Path(tempfile.mkdtemp(prefix="ftbench-"))
    return run_here(cfg, target).model_dump_json()


class RayPool:
    """Cells as Ray tasks: ``submit`` returns at once, ``next_done`` waits for any one (the tuning loop's
    :class:`harness.driver.pools.CellPool`). Each record is written into its results dir on the driver."""

    def __init__(self, address: str | None, slots: int) -> None:
        import ray

        if not ray.is_initialized():  # a local cluster's workers inherit this process's environment
            ray.init(
                address=address,
                include_dashboard=False,
                log_to_driver=False,
                **({} if address else {"num_cpus": os.cpu_count()}),
            )
        self.slots = max(1, slots)
        self.remote = ray.remote(_remote_cell)
        self.pending: dict = {}

    def submit(self, ticket, cfg: RunConfig, results_dir: Path, show: Callable[[str], None] | None = None) -> None:
        opts = dict(num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus, max_retries=cfg.retries)
        ref = self.remote.options(**opts).remote(cfg.model_dump_json(), str(Path(results_dir).resolve()))
        self.pending[ref] = (ticket, cfg, Path(results_dir), now_iso(), time.perf_counter())
        if show:
            show("on Ray")

    def next_done(self) -> tuple[object, RunRecord]:
        import ray

        ready, _ = ray.wait(list(self.pending), num_returns=1)
        ticket, cfg, results_dir, started, t0 = self.pending.pop(ready[0])
        try:
            rec = RunRecord.model_validate_json(ray.get(ready[0]))
        except (ray.exceptions.RayError, ValueError) as err:  # worker crashed, node lost, task error
            text = str(err).strip().splitlines()
            reason = f"ray: {type(err).__name__}: {' '.join(text[:3])[:500]}"
            rec = failure_record(cfg, "failed", reason, started, time.perf_counter() - t0)
        write_record(results_dir, rec)
        return ticket, rec

    def close(self) -> None:
        """Nothing to let go of: the cluster outlives the suite (a local one ends with this process)."""
