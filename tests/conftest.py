"""Shared helpers: tiny suites built in code, run in-process (fast) or through the real CLI (subprocess)."""

from __future__ import annotations

import atexit
import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import pytest

from harness.driver import forkserver
from harness.driver.suite import expand, parse_suite
from harness.schema import RunConfig

ROOT = Path(__file__).resolve().parents[1]
for _var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):  # as `ftbench` sets them
    os.environ.setdefault(_var, "1")
# One machine cache for the whole session, the cells' subprocesses included: the bf16 probe and the peak matmul
# rate are measured once per session (below), never per test. pytest_sessionfinish checks that from the log.
# Under pytest-xdist (`make test`: two workers) the workers share the controller's cache, so the probes and the
# SmolLM2 conversion happen once in all (the conversion holds a lock), not once per worker.
WORKER = os.environ.get("PYTEST_XDIST_WORKER")
if WORKER and os.environ.get("FTBENCH_TEST_SESSION_CACHE"):
    SESSION_CACHE = Path(os.environ["FTBENCH_TEST_SESSION_CACHE"])
else:
    SESSION_CACHE = Path(tempfile.mkdtemp(prefix="ftbench-test-cache-"))
    os.environ["FTBENCH_TEST_SESSION_CACHE"] = str(SESSION_CACHE)  # inherited by the workers started after this
    # removed at exit unless pytest_sessionfinish keeps it as evidence: a script that imports these helpers
    # (bench/validation.py) left one behind per run
    atexit.register(lambda: EVIDENCE or shutil.rmtree(SESSION_CACHE, ignore_errors=True))
EVIDENCE: list[Path] = []
os.environ["FTBENCH_CACHE_DIR"] = str(SESSION_CACHE)
os.environ["FTBENCH_KEEP_LOADED_PEAK"] = "1"  # a figure measured under load is kept (flagged), not re-measured
if WORKER:
    # Each worker gets its share of the cores: its own torch ops, its cells (FTBENCH_THREADS, read by each cell)
    # and its subprocesses (OMP_NUM_THREADS). Two workers with torch's two threads each took 649 s against 363 s
    # for one process (docs/speed_tests_parallel.md); with one thread each they take a third less.
    _threads = str(max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))
    os.environ.update(FTBENCH_THREADS=_threads, OMP_NUM_THREADS=_threads)


def _measure_the_machine() -> None:
    from harness.measure.hardware import peak_matmul

    for dtype in ("float32", "bfloat16"):
        peak_matmul(dtype, keep_loaded=True)


@pytest.hookimpl(tryfirst=True)
def pytest_sessionstart(session):
    """Under xdist the machine's peaks are measured in the controller while the workers start, and no test runs
    before they are cached (the workers read them from the shared cache): the measurement holds the session's
    `alone` lock (below), which every test takes. The workers' imports overlap it, so the figures are flagged as
    measured under load, and kept; measured before the workers started, they cost 5 s of every `make test`."""
    if WORKER:
        import torch

        torch.set_num_threads(int(os.environ["FTBENCH_THREADS"]))
    elif getattr(session.config.option, "numprocesses", None):
        import fcntl
        import threading

        lock = open(_ALONE_LOCK, "a")  # noqa: SIM115 - closed by the thread, when the peaks are cached
        fcntl.flock(lock, fcntl.LOCK_EX)  # taken here, before any worker starts

        def measure() -> None:
            try:
                _measure_the_machine()
            finally:
                lock.close()

        threading.Thread(target=measure, name="ftbench-measure", daemon=True).start()


@pytest.fixture(scope="session", autouse=True)
def _machine_measured_once():
    """Without xdist: before the first test that runs (a session whose tests are all skipped measures nothing)."""
    _measure_the_machine()


_ALONE_LOCK = SESSION_CACHE / ".alone.lock"


def pytest_collection_modifyitems(config, items):
    """Tests marked ``alone`` first: a worker waits for the other's current test to end before it runs one, and
    at the start that test is a short one, not SmolLM2's. Then the ``real_model`` ones, the longest (SmolLM2's
    63 s on one AVX2 core, MiniLM's two of 20 s): under ``--dist worksteal`` they start early, and the other
    worker's share and what it steals at the end are short tests, so neither waits long on the other's last."""
    items.sort(
        key=lambda item: (item.get_closest_marker("alone") is None, item.get_closest_marker("real_model") is None)
    )


@pytest.fixture(autouse=True)
def _alone_or_shared(request):
    """A test marked ``alone`` needs the machine to itself (it measures other processes' load): it takes the
    session's lock exclusively, every other test takes it shared. Without xdist the lock is never contended. What
    another worker's test left running (a zygote still importing, a Ray cluster) may outlive that test, so an
    ``alone`` test also waits, up to 30 s, for the machine to go quiet."""
    import fcntl

    alone = request.node.get_closest_marker("alone") is not None
    with open(_ALONE_LOCK, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX if alone else fcntl.LOCK_SH)
        if alone:
            from harness.measure.hardware import load_check

            for _ in range(60):
                if not load_check(0.5)["loaded"]:
                    break
        yield


def pytest_collection_finish(session):
    """What imports and collection made (torch, transformers, peft, every test module) moves out of the cyclic
    collector's way, as in a cell process (harness/cell/run.py: run_cell_file); the cells run in this process
    then pay for collections of their own objects only (about 12% of the in-process tests' time here)."""
    import gc

    gc.collect()
    gc.freeze()


def pytest_sessionfinish(session, exitstatus):
    """Fail the run if anything in it measured the probe or a peak twice on the session cache, then remove that
    cache (the SmolLM2 conversion and the probes: 6 MB in the temp dir per `make test`) unless it is evidence."""
    _close_all_zygotes()
    repeated = {k: n for k, n in measurement_counts(SESSION_CACHE, per_machine=True).items() if n > 1}
    if repeated:
        print(f"\nftbench: measured more than once in this test session ({SESSION_CACHE}): {repeated}")
        session.exitstatus = 1
        EVIDENCE.append(SESSION_CACHE)
    elif not WORKER:  # the controller, after every worker has ended
        shutil.rmtree(SESSION_CACHE, ignore_errors=True)


def measurement_counts(cache: Path, per_machine: bool = False) -> Counter:
    """'what:key' -> how many times it was measured on this cache (harness/measure/hardware.py logs each one); with
    ``per_machine`` apart for each machine identity (a Ray worker with 1 thread is another machine). Here, not in
    test_hardware.py: the xdist controller checks it at the end, and importing that module there imported torch,
    transformers and peft (5 s of every `make test`, after the last test)."""
    log = Path(cache) / "measurements.jsonl"
    lines = log.read_text().splitlines() if log.exists() else []
    return Counter(
        f"{d['what']}:{d['key']}" + (f"@{d['machine']}" if per_machine else "") for d in map(json.loads, lines)
    )


def tiny_suite(**over) -> dict:
    """A suite dict for tiny-bert on a small slice of Rotten Tomatoes; keyword args override top-level keys."""
    suite = {
        "name": "t",
        "models": ["tiny-bert"],
        "tasks": [{"name": "rotten_tomatoes", "train_examples": 128, "eval_examples": 64}],
        "train": {"steps": 4, "batch_size": 8, "lr": 1e-3, "max_seq_len": 32, "timing_warmup_steps": 1},
        "methods": [{"method": "lora", "config": {"r": 4}}],
        "seeds": [0],
        "timeout_s": 300,
        # deployment cost (harness/cell/deploy.py) is measured by tests/test_deploy.py and the SmolLM2 test; elsewhere
        # it would only add time
        "deploy": {"enabled": False},
    }
    suite.update(over)
    return suite


def cells(**over) -> list[RunConfig]:
    return expand(parse_suite(tiny_suite(**over), "<test>"))


def saved_tiny_bert(path: Path) -> str:
    """tiny-bert with seeded random weights saved as a model folder (with MiniLM's tokenizer, as tiny-bert reads):
    to ftbench, a pretrained model a user points at, whose base can be loaded again from disk."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from harness.cell.models import _tiny_config, load_tokenizer

    torch.manual_seed(1)
    AutoModelForSequenceClassification.from_config(_tiny_config("tiny-bert", 2)).save_pretrained(path)
    load_tokenizer("tiny-bert").save_pretrained(path)
    return str(path)


def ftbench(*args: str, cwd: Path | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """The real command line, in a subprocess."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "harness", *args],
        cwd=cwd or ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


# `ftbench run` called in the test process (run_cli, or run_suite directly) keeps its cell zygote for the next
# test instead of starting one per run (~10 s of imports each); the session's zygotes close at its end. A zygote
# is keyed by its environment: PYTEST_CURRENT_TEST (new every test) is left out of it, and the libraries' own
# variables (set when first imported) are set before the first one starts. A test that changes the environment
# (another FTBENCH_CACHE_DIR) gets a zygote of its own, closed when its run ends.
def pytest_configure(config):
    """Where tests run (one process, or an xdist worker), the libraries are imported and quietened before any
    test starts a zygote. An xdist controller runs no test: it skips them (4 s before the workers could start)."""
    if WORKER or not getattr(config.option, "numprocesses", None):
        # sklearn sets KMP_DUPLICATE_LIB_OK and KMP_INIT_AT_FORK when imported: a test importing it later would
        # change the zygote's key and start another (seconds of imports, in each worker)
        import sklearn.metrics  # noqa: F401

        import harness.cell.run  # noqa: F401
        from harness.libs import quiet_libraries

        quiet_libraries()


_close_all_zygotes, _server_for = forkserver.close_all, forkserver.server_for


@contextlib.contextmanager
def _without_pytest_vars():
    current = os.environ.pop("PYTEST_CURRENT_TEST", None)
    try:
        yield
    finally:
        if current is not None:
            os.environ["PYTEST_CURRENT_TEST"] = current


def _session_server_for(allow_network: bool) -> forkserver.ForkServer:
    with _without_pytest_vars():
        return _server_for(allow_network)


def _close_all_but_the_sessions() -> None:
    from harness.driver.forkserver import cell_env

    with _without_pytest_vars():
        keep = {forkserver.zygote_key(cell_env(net)) for net in (False, True)}
    for key, server in list(forkserver._SERVERS.items()):
        if forkserver.zygote_key(server.env) not in keep:
            forkserver._SERVERS.pop(key).close()


forkserver.server_for, forkserver.close_all = _session_server_for, _close_all_but_the_sessions


def run_cli(*args: str) -> subprocess.CompletedProcess:
    """``ftbench <args>`` in this process (the cells still run in processes of their own), output captured."""
    from harness.driver.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(list(args))
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else 1
    return subprocess.CompletedProcess(["ftbench", *args], rc, out.getvalue(), err.getvalue())


@pytest.fixture
def write_suite(tmp_path):
    import yaml

    def _write(data: dict, name: str = "suite.yaml") -> Path:
        p = tmp_path / name
        p.write_text(yaml.safe_dump(data))
        return p

    return _write
