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
import yaml

from harness.records import cell_identity, load_records, read_record
from tests.conftest import ROOT, run_cli, tiny_suite
from tests.test_runner import broken_model

LONG = {"steps": 200000, "batch_size": 8, "max_seq_len": 32}


def _records(d: Path) -> dict[str, dict]:
    return {p.name: json.loads(p.read_text()) for p in (d / "records").glob("*.json")}


def _start(suite_path: Path, results: Path) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)  # as in a user's shell: torch set it in this test process
    return subprocess.Popen(
        [sys.executable, "-m", "harness", "run", str(suite_path), "--results", str(results)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _cell_children(pid: int) -> list[psutil.Process]:
    """The runner's cell processes: fresh `_cell` processes, or forks of its zygote (harness/driver/forkserver.py)
    that write a cell's log (the zygote's other forks run the driver's checks: harness/driver/torchside.py)."""

    def is_cell(c: psutil.Process) -> bool:
        cmd = " ".join(c.cmdline())
        if "_cell" in cmd:
            return True
        if not ("_zygote" in cmd and "_zygote" in " ".join(c.parent().cmdline())):
            return False
        try:
            return "/logs/" in os.readlink(f"/proc/{c.pid}/fd/1")
        except OSError:  # it has ended meanwhile
            return False

    try:
        return [c for c in psutil.Process(pid).children(recursive=True) if is_cell(c)]
    except psutil.NoSuchProcess:
        return []


def _in_training(results: Path) -> bool:
    """A cell's log shows a training step (harness/progress.py writes "step N/M")."""
    return any(re.search(r"\bstep \d+/", p.read_text(errors="replace")) for p in (results / "logs").glob("*.log"))


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
    assert len(rec["training"]["losses"]) == step + 1 < 50  # stopped at once, curve kept up to the bad step


def test_timeout_is_recorded(tmp_path, write_suite):
    out = run_cli("run", str(write_suite(tiny_suite(timeout_s=2, train=LONG))), "--results", str(tmp_path))
    (rec,) = _records(tmp_path).values()
    assert out.returncode == 1 and rec["status"] == "timeout" and "timeout_s=2" in rec["error"]


@pytest.mark.real_model
def test_out_of_memory_under_a_memory_limit(tmp_path, write_suite):
    """RLIMIT_AS in the run process: the allocator fails, the record says oom and keeps what was measured before
    (the parameter counts); the test split, read only after training, was not read."""
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
    assert "allocate memory" in rec["error"] and rec["trainable_params"] > 0
    assert rec["eval_before"] is None and rec["eval_after"] is None


def test_killed_run_process_is_a_failed_record_and_the_suite_goes_on(tmp_path, write_suite):
    suite = tiny_suite(methods=[{"method": "lora", "variant": "long", "train": LONG}, {"method": "full"}])
    runner = _start(write_suite(suite), tmp_path)
    (child,) = _wait_for(lambda: _cell_children(runner.pid))
    _wait_for(lambda: _in_training(tmp_path))  # killed while it trains, not while it loads
    child.send_signal(signal.SIGKILL)
    runner.wait(timeout=300)
    recs = {r["variant"] + r["method"]: r for r in _records(tmp_path).values()}
    assert recs["longlora"]["status"] == "failed" and "killed by SIGKILL" in recs["longlora"]["error"]
    assert recs["defaultfull"]["status"] == "ok"


def test_kill_the_runner_then_resume(tmp_path, write_suite):
    """SIGKILL the runner mid-suite: its run dies with it; a new `ftbench run` keeps every finished record
    byte for byte, reruns only the interrupted cell, and leaves no temp files or duplicates."""
    suite = write_suite(
        # 300 steps: ~2.5 s of training on one AVX2 thread, long enough to be killed mid-run, short to run again
        tiny_suite(methods=[{"method": "full"}, {"method": "lora", "variant": "slow", "train": {"steps": 300}}])
    )
    runner = _start(suite, tmp_path)
    _wait_for(lambda: len(_records(tmp_path)) == 1)
    (child,) = _wait_for(lambda: _cell_children(runner.pid))
    first = _records(tmp_path)
    # one zygote served the run: the one started before the checks, although torch set TORCHINDUCTOR_CACHE_DIR
    # in the runner while they built an optimizer (a second zygote's imports once delayed every first cell)
    zygotes = [c for c in psutil.Process(runner.pid).children() if "_zygote" in " ".join(c.cmdline())]
    assert len(zygotes) == 1, [" ".join(z.cmdline()) for z in zygotes]
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
        assert not re.search(r"import pickle|pickle\.loads?\(|import dill", text), p  # no unpickling of our own
    models = (ROOT / "harness" / "cell" / "models.py").read_text()
    assert "use_safetensors=None if allow_pickle else True" in models  # pickled weights only on request


def test_runs_are_offline_and_record_it(tmp_path, write_suite):
    out = run_cli("run", str(write_suite(tiny_suite())), "--results", str(tmp_path))
    assert out.returncode == 0
    (rec,) = _records(tmp_path).values()
    assert rec["environment"]["hf_hub_offline"] == "1" and rec["model_info"]["trust_remote_code"] is False
    assert rec["seed"] == 0 and rec["environment"]["versions"]["torch"]
    assert read_record(next((tmp_path / "records").glob("*.json"))).status == "ok"


@pytest.fixture(scope="module")
def two_cells(tmp_path_factory):
    """A finished two-method suite (its results dir is copied by each test that damages it)."""
    d = tmp_path_factory.mktemp("two")
    suite = d / "s.yaml"
    suite.write_text(
        yaml.safe_dump(tiny_suite(methods=[{"method": "lora", "config": {"r": 4}}, {"method": "full"}], export=False))
    )
    out = run_cli("run", str(suite), "--results", str(d / "r"))
    assert out.returncode == 0, out.stderr[-2000:]
    return suite, d / "r"


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage", "wrong_schema"])
def test_a_corrupt_record_is_named_and_everything_else_renders(two_cells, tmp_path, damage):
    _, results = two_cells
    r = _copy(results, tmp_path / "r")
    lora, full = sorted((r / "records").glob("*.json"), key=lambda p: "full" in p.name)
    text = lora.read_text()
    lora.write_text(
        {"truncated": text[: len(text) // 2], "empty": "", "garbage": "\x00\xff not json", "wrong_schema": '{"a": 1}'}[
            damage
        ]
    )
    for cmd in (
        ["summary", str(r)],
        ["report", str(r)],
        ["report", str(r), "--format", "md"],
        ["compare", str(r), str(results)],
    ):
        out = run_cli(*cmd)
        assert out.returncode == 0, (cmd, out.stderr[-1500:])
        warnings = [line for line in out.stderr.splitlines() if "unreadable record" in line]
        assert len(warnings) == 1 and str(lora) in warnings[0], (cmd, out.stderr)
        assert "Traceback" not in out.stderr
    assert "full" in (r / "report.html").read_text()
    assert "unreadable record" in (r / "report.html").read_text()  # the report says it too


def test_a_changed_config_reruns_its_cells_and_never_mixes_them(two_cells, tmp_path):
    suite, results = two_cells
    r = _copy(results, tmp_path / "r")
    data = yaml.safe_load(suite.read_text())
    data["methods"] = data["methods"][:1]  # full is gone from the suite
    data["train"]["steps"] = 3  # lora's config changed
    edited = tmp_path / "s.yaml"
    edited.write_text(yaml.safe_dump(data))
    old_ids = sorted(p.stem for p in (r / "records").glob("*.json"))
    # what each earlier run exported (this fixture exports nothing, to save time): one folder under the record's
    # id, one as an earlier ftbench named it (by the config with `auto` dtypes resolved), found from the record
    folders = [old_ids[0], cell_identity(old_ids[1]) + "__0123456789"]
    for cell_id, folder in zip(old_ids, folders, strict=True):
        (r / "exports" / folder / "merged").mkdir(parents=True)
        (r / "exports" / folder / "merged" / "README.md").write_text(cell_id)
        data = json.loads((r / "records" / f"{cell_id}.json").read_text())
        data["exports"] = [{"kind": "merged", "path": str(r / "exports" / folder / "merged"), "bytes_on_disk": 1}]
        (r / "records" / f"{cell_id}.json").write_text(json.dumps(data))
    out = run_cli("run", str(edited), "--results", str(r))
    assert out.returncode == 0, out.stderr[-2000:]
    assert "config changed, rerunning: lora/default s0 on rotten_tomatoes (train.steps 4 → 3)" in out.stderr
    msg = "2 earlier record(s) (1 of cells this suite no longer has) with 2 export folder(s) moved to"
    assert msg in out.stderr, out.stderr
    (aside,) = (r / "stale").iterdir()  # the artifacts went with their records: exports/ is this suite's only
    assert sorted(p.name for p in (aside / "exports").iterdir()) == sorted(folders)
    assert not set(folders) & {p.name for p in (r / "exports").iterdir()}
    (rec,) = (r / "records").glob("*.json")
    assert len(json.loads(rec.read_text())["training"]["losses"]) == 3
    assert len(list((r / "stale").rglob("*.json"))) == 2  # kept, not deleted
    assert "1 runs, 1 ok" in (r / "report.html").read_text()
    # A results dir that already mixes two configs of one cell (an older ftbench) shows the newest only.
    from reports.html import load_results

    mixed = _copy(results, tmp_path / "mixed")
    (mixed / "cells_index.json").unlink()
    (mixed / "records" / rec.name).write_text(rec.read_text())
    res = load_results(mixed)
    loras = [x for x in res.records if x.method == "lora"]
    assert len(loras) == 1 and len(loras[0].training.losses) == 3 and any("earlier config" in p for p in res.problems)
    # the DataFrame the README advertises holds the same current records, not every file in records/ (issue 28)
    df = load_records(mixed)
    assert len(df) == len(res.records) and sorted(df["cell_id"]) == sorted(x.cell_id for x in res.records)


def test_a_changed_cell_left_out_by_only_is_not_said_to_rerun(two_cells, tmp_path):
    from harness.driver.runner import set_aside_stale
    from harness.driver.suite import expand, parse_suite

    suite, results = two_cells
    data = yaml.safe_load(suite.read_text())
    data["train"]["steps"] = 3  # both cells changed; `--only lora` runs one
    cells = expand(parse_suite(data, "<test>"))
    lines = set_aside_stale(cells, _copy(results, tmp_path / "r"), {c.cell_id for c in cells if c.method == "lora"})
    assert sorted(line.split(" s0 ")[0] for line in lines[:2]) == [
        "config changed, not rerun now (left out by --only): full/default",
        "config changed, rerunning: lora/default",
    ], lines


def test_raising_the_timeout_reruns_nothing_and_a_record_under_an_older_id_is_kept(two_cells, tmp_path):
    """How a cell runs (timeout_s, retries, num_cpus, memory_limit_mb) is not part of its id (issue 28): an edit
    of those reran every cell. A record whose id an older ftbench computed with them is kept under the new id."""
    suite, results = two_cells
    r = _copy(results, tmp_path / "r")
    lora = next(p for p in (r / "records").glob("*.json") if "lora" in p.name)
    older = json.loads(lora.read_text())
    older["cell_id"] = lora.stem.rsplit("__", 1)[0] + "__0123456789"  # the id as a run-settings hash made it
    folder = r / "exports" / older["cell_id"] / "merged"  # what it exported (the fixture exports nothing), carded
    folder.mkdir(parents=True)
    (folder / "README.md").write_text(f"Written by ftbench: `records/{older['cell_id']}.json`")
    older["exports"] = [{"kind": "merged", "path": str(folder), "bytes_on_disk": 1}]
    (r / "records" / f"{older['cell_id']}.json").write_text(json.dumps(older))
    lora.unlink()
    data = yaml.safe_load(suite.read_text())
    data.update(timeout_s=data.get("timeout_s", 300) * 2, retries=1)
    edited = tmp_path / "s.yaml"
    edited.write_text(yaml.safe_dump(data))
    out = run_cli("run", str(edited), "--results", str(r))
    assert out.returncode == 0, out.stderr[-2000:]
    assert "2 cells, 2 already recorded, 0 to run" in out.stderr, out.stderr
    assert "1 record(s) kept under a new cell id" in out.stderr and not (r / "stale").exists()
    records = sorted((r / "records").glob("*.json"))
    assert len(records) == 2 and all(json.loads(p.read_text())["cell_id"] == p.stem for p in records)
    assert lora in records  # the older record now sits under the current id
    assert f"`records/{lora.stem}.json`" in (folder / "README.md").read_text()  # and its export's card says so


def test_a_full_disk_is_one_line_and_another_output_still_works(two_cells, tmp_path, monkeypatch):
    import errno

    import harness.atomic

    _, results = two_cells
    real = harness.atomic.atomic_write_text

    def full_disk(path, text):
        if Path(path).resolve().is_relative_to(results.resolve()):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, text)

    monkeypatch.setattr(harness.atomic, "atomic_write_text", full_disk)
    before = {p.name: p.read_bytes() for p in (results / "records").glob("*.json")}
    out = run_cli("report", str(results))
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 1 and len(lines) == 1, out.stderr
    assert "cannot write" in lines[0] and "report.html" in lines[0] and "ENOSPC" in lines[0]
    elsewhere = tmp_path / "elsewhere.html"
    out = run_cli("report", str(results), "-o", str(elsewhere))
    assert out.returncode == 0 and elsewhere.stat().st_size > 10_000, out.stderr
    assert {p.name: p.read_bytes() for p in (results / "records").glob("*.json")} == before  # records whole


def test_kept_and_gone_records_are_counted_apart(two_cells, tmp_path):
    """A record kept under a new id and one of a cell the suite no longer has, in one run: the line about the
    records set aside counts the gone one (the kept one's line was counted as a changed cell)."""
    suite, results = two_cells
    r = _copy(results, tmp_path / "r")
    lora = next(p for p in (r / "records").glob("*.json") if "lora" in p.name)
    older = json.loads(lora.read_text())
    older["cell_id"] = lora.stem.rsplit("__", 1)[0] + "__0123456789"
    (r / "records" / f"{older['cell_id']}.json").write_text(json.dumps(older))
    lora.unlink()
    data = yaml.safe_load(suite.read_text())
    data["methods"] = [m for m in data["methods"] if m["method"] != "full"]
    edited = tmp_path / "s.yaml"
    edited.write_text(yaml.safe_dump(data))
    out = run_cli("run", str(edited), "--results", str(r))
    assert out.returncode == 0, out.stderr[-2000:]
    assert "1 record(s) kept under a new cell id" in out.stderr
    assert "1 earlier record(s) (1 of cells this suite no longer has) moved to" in out.stderr, out.stderr
