"""Progress inside a cell: step lines from the cell's process, rate-limited, tailed by the runner."""

import re

import torch

from harness.driver import forkserver
from harness.driver.executor import run_cell_subprocess
from harness.progress import MARK, CellProgress, LogTail, fmt_duration
from tests.conftest import cells


def test_log_tail_returns_each_new_complete_progress_line_once(tmp_path):
    log = tmp_path / "cell.log"
    tail = LogTail(log)
    assert tail.poll() == [] and tail.latest is None  # no log yet
    log.write_text(f"noise\n{MARK}loading x\n{MARK}step 1/9 · 0.50 s/step · ETA 4s\nWarning: libr")
    assert tail.poll() == ["loading x", "step 1/9 · 0.50 s/step · ETA 4s"]  # both, though read in one poll
    with open(log, "a") as fh:
        fh.write(f"ary noise\n{MARK}step 2/9 · 0.4")  # a line still being written is not shown half
    assert tail.poll() == [] and tail.latest == "step 1/9 · 0.50 s/step · ETA 4s"
    with open(log, "a") as fh:
        fh.write("0 s/step · ETA 3s\n")
    assert tail.poll() == ["step 2/9 · 0.40 s/step · ETA 3s"] and tail.latest == "step 2/9 · 0.40 s/step · ETA 3s"


def test_step_lines_are_rate_limited_and_keep_first_and_last(capsys, monkeypatch):
    monkeypatch.setattr(CellProgress, "_contention", lambda self: [])  # a busy test machine is another test's
    cfg = cells()[0]
    p = CellProgress(
        cfg, {"train.dtype": {"choice": "float32", "value": "float32", "why": ""}}, torch.device("cpu"), interval_s=3600
    )
    for i in range(1, 101):
        p.step(i, 100, 0.25)
    lines = capsys.readouterr().out.splitlines()
    assert lines == [f"{MARK}step 1/100 · 0.25 s/step · ETA 25s", f"{MARK}step 100/100 · 0.25 s/step · ETA 0s"]
    assert fmt_duration(92) == "1m 32s" and fmt_duration(7325) == "2h 02m"


PHASES = ("loading", "step ", "evaluating after training")


def test_the_runner_sees_the_cells_steps_while_it_trains(tmp_path):
    cfg = cells(
        train={"steps": 400, "batch_size": 8, "max_seq_len": 32, "timing_warmup_steps": 1},
        tasks=[{"name": "rotten_tomatoes", "train_examples": 128, "eval_examples": 64}],
    )[0]
    seen: list[str] = []
    server = forkserver.server_for(allow_network=False)  # the session's zygote: the cell is a fork, as in a run
    rec = run_cell_subprocess(cfg.model_copy(update={"export": False}), tmp_path, seen.append, server)
    assert rec.status == "ok", rec.error
    steps = [int(m.group(1)) for line in seen if (m := re.match(r"step (\d+)/400 · [\d.]+ s/step · ETA ", line))]
    assert len(steps) >= 2 and steps == sorted(steps) and steps[0] < 400 and steps[-1] == 400  # in order
    # every stage reaches the runner however fast it passes (CI once ran the evaluation between two polls)
    first = {word: next((i for i, line in enumerate(seen) if line.startswith(word)), None) for word in PHASES}
    assert None not in first.values(), seen
    assert first["loading"] < first["step "] < first["evaluating after training"], seen
    log = (tmp_path / "logs" / f"{cfg.model_copy(update={'export': False}).cell_id}.log").read_text()
    ours = [line for line in log.splitlines() if line.startswith(MARK)]
    assert f"{MARK}step 400/400" in log and ours[0].startswith(f"{MARK}hardware: ")  # identity comes first


def test_the_run_output_ends_without_a_stale_stage_line(tmp_path, write_suite):
    """After the last cell, the progress bar says the cells are done rather than showing the last cell's last
    stage (issue 31: "evaluating the untrained model…" was left on screen after the last ok line)."""
    from tests.conftest import run_cli, tiny_suite

    out = run_cli("run", str(write_suite(tiny_suite())), "--results", str(tmp_path / "r"))
    assert out.returncode == 0, out.stderr[-2000:]
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    last_ok = max(i for i, line in enumerate(lines) if line.startswith("ok "))
    after = "\n".join(lines[last_ok + 1 :])
    assert "cells done" in after and "evaluating" not in after and "loading" not in after, after


def test_the_suites_eta_expects_each_pending_cell_to_take_what_its_configuration_took():
    """A pending seed of a slow configuration counts as slow, a configuration not yet seen as the mean; jobs
    share the wait; the figure counts down between finishes; nothing before the first finish or after the last."""
    from harness.progress import SuiteEta

    now = [0.0]
    cells = {"a0": "slow", "a1": "slow", "b0": "fast", "b1": "fast", "c0": "new"}
    eta = SuiteEta(cells, parallel=1, clock=lambda: now[0])
    assert eta.text() == ""
    eta.finished("a0", 90.0)
    eta.finished("b0", 10.0)
    assert eta.seconds() == 90 + 10 + 50  # a1 as slow, b1 as fast, c0 as the mean of both
    now[0] = 30.0
    assert eta.seconds() == 120 and eta.text() == "ETA ~2m 00s"
    assert SuiteEta(cells, parallel=2, clock=lambda: 0.0).seconds() is None
    two = SuiteEta(cells, parallel=2, clock=lambda: 0.0)
    two.finished("a0", 90.0)
    assert two.seconds() == 4 * 90 / 2
    for c in ("a1", "b0", "b1", "c0"):
        two.finished(c, 1.0)
    assert two.text() == ""
    ray = SuiteEta(cells, parallel=0, clock=lambda: 0.0)  # a cluster's parallelism is not known here
    ray.finished("a0", 90.0)
    assert ray.text() == ""
