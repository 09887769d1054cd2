"""One cell dispatcher (harness/driver/pools.py): the run and tuning drive the same pools; a local pool runs
``jobs`` cells side by side and never more; a typed training sub-record; schema-1 records still read."""

import json
import os
import threading

import pytest

from harness.driver.pools import LocalPool, run_all
from harness.records import RunRecord, read_record


class _Cfg:
    def __init__(self, i: int) -> None:
        self.cell_id = f"c{i}"


def test_a_local_pool_runs_jobs_cells_side_by_side_and_never_more(monkeypatch):
    monkeypatch.delenv("FTBENCH_JOBS", raising=False)
    both_in = threading.Barrier(2, timeout=30)  # passes only if two cells are in flight at once
    lock, flight, most, env = threading.Lock(), [0], [0], []

    def execute(cfg, results_dir):
        with lock:
            flight[0] += 1
            most[0] = max(most[0], flight[0])
        env.append(os.environ.get("FTBENCH_JOBS"))
        both_in.wait()
        with lock:
            flight[0] -= 1
        return f"record of {cfg.cell_id}"

    pool = LocalPool(jobs=2, execute=execute)
    done = []
    try:
        run_all(pool, [_Cfg(i) for i in range(6)], "dir", lambda cfg: None, lambda cfg, rec: done.append(rec))
    finally:
        pool.close()
    assert sorted(done) == [f"record of c{i}" for i in range(6)]
    assert most[0] == 2 and set(env) == {"2"}  # each cell process reads how many ran beside it
    assert "FTBENCH_JOBS" not in os.environ  # the pool gives the environment back


def test_one_job_runs_each_cell_when_its_record_is_asked_for_in_submission_order():
    order = []

    def execute(cfg, results_dir, show):
        show("running")
        order.append(cfg.cell_id)
        return cfg.cell_id

    pool, shown = LocalPool(execute=execute), []
    pool.submit("a", _Cfg(0), "dir", shown.append)
    pool.submit("b", _Cfg(1), "dir", shown.append)
    assert order == []  # a study proposes its next trial only after this one ends: nothing runs ahead
    assert pool.next_done() == ("a", "c0") and pool.next_done() == ("b", "c1")
    assert shown == ["running", "running"]


def test_a_runner_bug_inside_a_pool_is_raised_not_swallowed():
    def execute(cfg, results_dir):
        raise RuntimeError("bug in the runner")

    pool = LocalPool(jobs=2, execute=execute)
    try:
        with pytest.raises(RuntimeError, match="bug in the runner"):
            run_all(pool, [_Cfg(0), _Cfg(1)], "dir", lambda cfg: None, lambda cfg, rec: None)
    finally:
        pool.close()


def test_a_schema_1_record_is_read_into_the_typed_training_sub_record(tmp_path):
    """Records written before the loop's figures were nested (schema 1: docs/results/scale until 2026-12-08)
    still read."""
    flat = {
        "schema_version": 1,
        "cell_id": "m__t__lora-default__s0__abc",
        "suite": "s",
        "method": "lora",
        "variant": "default",
        "model": "m",
        "task": "t",
        "seed": 0,
        "status": "ok",
        "started_at": "2026-12-01T00:00:00+00:00",
        "wall_time_s": 1.0,
        "config": {},
        "environment": {},
        "losses": [0.7, 0.6],
        "step_times_s": [0.2, 0.1],
        "tokens_per_s": 123.0,
        "peak_live_tensor_bytes": 4096,
        "peak_rss_bytes": 8192,
    }
    path = tmp_path / "old.json"
    path.write_text(json.dumps(flat))
    rec = read_record(path)
    assert rec.training.losses == [0.7, 0.6] and rec.training.tokens_per_s == 123.0
    assert rec.training.peak_live_tensor_bytes == 4096 and rec.peak_rss_bytes == 8192  # the process's stays on top
    written = json.loads(rec.model_dump_json())
    assert "losses" not in written and written["training"]["step_times_s"] == [0.2, 0.1]
    with pytest.raises(ValueError, match="(?i)extra inputs"):  # the sub-record is as strict as the record
        RunRecord.model_validate({**flat, "training": {"losses_typo": []}})
