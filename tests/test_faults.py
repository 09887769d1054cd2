"""Nothing lost, nothing trusted: every fault through the real runner and real subprocesses (`ftbench run` in
this process via run_cli, or as a process of its own where the test signals it; each cell in its own process)."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from harness.records import load_records, read_record
from tests.conftest import ROOT, run_cli, tiny_suite
from tests.test_runner import broken_model

LONG = {"steps": 200000, "batch_size": 8, "max_seq_len": 32}


def _records(d: Path) -> dict[str, dict]:
    return {p.name: json.loads(p.read_text()) for p in (d / "records").glob("*.json")}


def _start(suite_path: Path, results: Path) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "harness", "run", str(suite_path), "--results", str(results)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _cell_children(pid: int) -> list[psutil.Process]:
    """The runner's cell processes: fresh `_cell` processes, or forks of its zygote (harness/forkserver.py)."""

    def is_cell(c: psutil.Process) -> bool:
        cmd = " ".join(c.cmdline())
        return "_cell" in cmd or ("_zygote" in cmd and "_zygote" in " ".join(c.parent().cmdline()))

    try:
        return [c for c in psutil.Process(pid).children(recursive=True) if is_cell(c)]
    except psutil.NoSuchProcess:
        return []


def _wait_for(cond, timeout=120.0, every=0.2):
    t0 = time.time()
    while time.time() - t0 < timeout:
        v = cond()
        if v:
            return v
        time.sleep(every)
    raise AssertionError("timed out waiting")


def test_crash_recorded_as_failed_and_suite_goes_on(tmp_path, write_suite):
    broken = broken_model(tmp_path)
    path = write_suite(tiny_suite(models=[broken, "tiny-bert"]))
    out = run_cli("run", str(path), "--results", str(tmp_path / "r"))
    assert out.returncode == 1, out.stderr  # not every run ok
    df = load_records(tmp_path / "r")
    status = dict(zip(df["model"], df["status"], strict=True))
    assert status == {broken: "failed", "tiny-bert": "ok"}
    err = df.set_index("model").loc[broken, "error"]
    assert err.startswith("SafetensorError") and "Traceback" in err
    assert "| failed" in run_cli("report", str(tmp_path / "r"), "--format", "md").stdout


def test_nan_loss_stops_the_run_at_once(tmp_path, write_suite):
    train = {"steps": 50, "batch_size": 8, "lr": 1e30, "optimizer": "sgd", "max_grad_norm": None, "max_seq_len": 32}
    out = run_cli(
        "run", str(write_suite(tiny_suite(train=train, methods=[{"method": "full"}]))), "--results", str(tmp_path)
    )
    (rec,) = _records(tmp_path).values()
    assert out.returncode == 1 and rec["status"] == "failed"
    step = int(re.search(r"non-finite loss nan at step (\d+)", rec["error"]).group(1))
    assert len(rec["losses"]) == step + 1 < 50  # stopped at once, curve kept up to the bad step


def test_timeout_is_recorded(tmp_path, write_suite):
    out = run_cli("run", str(write_suite(tiny_suite(timeout_s=2, train=LONG))), "--results", str(tmp_path))
    (rec,) = _records(tmp_path).values()
    assert out.returncode == 1 and rec["status"] == "timeout" and "timeout_s=2" in rec["error"]


@pytest.mark.real_model
def test_out_of_memory_under_a_memory_limit(tmp_path, write_suite):
    """RLIMIT_AS in the run process: the allocator fails, the record says oom, the before-eval is kept."""
    suite = tiny_suite(
        models=["minilm-l6"],
        tasks=[{"name": "rotten_tomatoes", "train_examples": 256, "eval_examples": 32}],
        train={"steps": 2, "batch_size": 256, "max_seq_len": 128, "eval_batch_size": 32},
        methods=[{"method": "full"}],
        memory_limit_mb=1800,
        export=False,
    )
    out = run_cli("run", str(write_suite(suite)), "--results", str(tmp_path))
    (rec,) = _records(tmp_path).values()
    assert out.returncode == 1 and rec["status"] == "oom", rec["error"]
    assert "allocate memory" in rec["error"] and rec["eval_before"] is not None


def test_killed_run_process_is_a_failed_record_and_the_suite_goes_on(tmp_path, write_suite):
    suite = tiny_suite(methods=[{"method": "lora", "variant": "long", "train": LONG}, {"method": "full"}])
    runner = _start(write_suite(suite), tmp_path)
    (child,) = _wait_for(lambda: _cell_children(runner.pid))
    time.sleep(3)  # let it get into training
    child.send_signal(signal.SIGKILL)
    runner.wait(timeout=300)
    recs = {r["variant"] + r["method"]: r for r in _records(tmp_path).values()}
    assert recs["longlora"]["status"] == "failed" and "killed by SIGKILL" in recs["longlora"]["error"]
    assert recs["defaultfull"]["status"] == "ok"


def test_kill_the_runner_then_resume(tmp_path, write_suite):
    """SIGKILL the runner mid-suite: its run dies with it; a new `ftbench run` keeps every finished record
    byte for byte, reruns only the interrupted cell, and leaves no temp files or duplicates."""
    suite = write_suite(
        tiny_suite(methods=[{"method": "full"}, {"method": "lora", "variant": "slow", "train": {"steps": 800}}])
    )
    runner = _start(suite, tmp_path)
    _wait_for(lambda: len(_records(tmp_path)) == 1)
    (child,) = _wait_for(lambda: _cell_children(runner.pid))
    first = _records(tmp_path)
    runner.send_signal(signal.SIGKILL)
    runner.wait()
    _wait_for(lambda: not child.is_running() or child.status() == psutil.STATUS_ZOMBIE, timeout=10)
    assert _records(tmp_path) == first  # the orphaned run did not write behind our back
    out = run_cli("run", str(suite), "--results", str(tmp_path))
    assert out.returncode == 0, out.stderr
    assert "1 already recorded, 1 to run" in out.stderr
    after = _records(tmp_path)
    assert len(after) == 2 and all(r["status"] == "ok" for r in after.values())
    assert {k: v for k, v in after.items() if k in first} == first
    assert not list((tmp_path / "records").glob(".*"))


def test_concurrent_runner_is_refused(tmp_path, write_suite):
    suite = write_suite(tiny_suite(train=LONG, timeout_s=60))
    runner = _start(suite, tmp_path)
    try:
        _wait_for(lambda: _cell_children(runner.pid))
        second = run_cli("run", str(suite), "--results", str(tmp_path))
        assert second.returncode == 2
        assert f"is in use by another ftbench run (pid {runner.pid})" in second.stderr
        assert len(second.stderr.strip().splitlines()) == 1
    finally:
        runner.kill()
        runner.wait()


def test_safe_loading_rules():
    """yaml.safe_load only; torch.load only with weights_only=True; trust_remote_code off unless asked."""
    src = [p for d in ("harness", "methods", "reports") for p in (ROOT / d).rglob("*.py")]
    for p in src:
        text = p.read_text()
        assert not re.search(r"yaml\.load\(", text), p
        assert all("weights_only=True" in line for line in text.splitlines() if "torch.load(" in line), p
        assert "pickle" not in text, p


def test_runs_are_offline_and_record_it(tmp_path, write_suite):
    out = run_cli("run", str(write_suite(tiny_suite())), "--results", str(tmp_path))
    assert out.returncode == 0
    (rec,) = _records(tmp_path).values()
    assert rec["environment"]["hf_hub_offline"] == "1" and rec["model_info"]["trust_remote_code"] is False
    assert rec["seed"] == 0 and rec["environment"]["versions"]["torch"]
    assert read_record(next((tmp_path / "records").glob("*.json"))).status == "ok"
