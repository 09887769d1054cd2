"""The suite runner with real subprocesses: crash isolation, timeout, resume, summary."""

import json
import os

import pytest

from harness.driver.runner import pending_cells, run_suite
from harness.driver.suite import expand, parse_suite
from harness.records import read_record
from tests.conftest import run_cli, tiny_suite


def broken_model(tmp_path) -> str:
    """A local model whose config is valid (validation builds its skeleton and passes) and whose weights are
    garbage: its runs fail while loading, after the suite started, as a crash in a run would."""
    from harness.cell.models import _tiny_config

    path = tmp_path / "broken-model"
    _tiny_config("tiny-bert", 2).save_pretrained(path)
    (path / "model.safetensors").write_bytes(b"not a safetensors file")
    return str(path)


def test_resume_skips_recorded_cells(tmp_path, write_suite):
    path = write_suite(tiny_suite(methods=[{"method": "lora"}, {"method": "full"}]))
    first = run_cli("run", str(path), "--results", str(tmp_path / "r"))
    assert first.returncode == 0, first.stderr
    recs = {p.name: p.read_text() for p in (tmp_path / "r" / "records").glob("*.json")}
    assert len(recs) == 2
    card = next((tmp_path / "r" / "exports").glob("*lora*/adapter/README.md"))
    card.write_text("---\nlibrary_name: peft\n---\n# Model Card for Model ID\n")  # an ftbench before the cards
    second = run_cli("run", str(path), "--results", str(tmp_path / "r"))
    assert second.returncode == 0 and "2 already recorded, 0 to run" in second.stderr
    assert "Written by ftbench" in card.read_text()  # a resumed record gets its card
    assert {p.name: p.read_text() for p in (tmp_path / "r" / "records").glob("*.json")} == recs
    assert "lora" in second.stdout and "full" in second.stdout  # the summary still shows both
    # a record cut short (a copy interrupted) is no record: the next run sets it aside and runs its cell again
    cut = sorted((tmp_path / "r" / "records").glob("*.json"))[0]
    cut.write_text(recs[cut.name][:300])
    third = run_cli("run", str(path), "--results", str(tmp_path / "r"))
    assert third.returncode == 0 and "unreadable record, rerunning: " in third.stderr
    assert "1 already recorded, 1 to run" in third.stderr and read_record(cut).status == "ok"
    (aside,) = (tmp_path / "r" / "stale").glob(f"*/{cut.name}")
    assert aside.read_text() == recs[cut.name][:300]


def test_resume_runs_only_missing_cells_and_retry_failed(tmp_path):
    broken = broken_model(tmp_path)
    suite = parse_suite(tiny_suite(models=["tiny-bert", broken]), "<t>")
    cells = expand(suite)
    recs = run_suite(suite, "", tmp_path / "r", quiet=True)
    assert sorted(r.status for r in recs) == ["failed", "ok"]
    assert pending_cells(cells, tmp_path / "r", retry_failed=False) == []
    (retry,) = pending_cells(cells, tmp_path / "r", retry_failed=True)
    assert retry.model.name == broken


def test_record_has_every_field(tmp_path, write_suite):
    path = write_suite(tiny_suite())
    out = run_cli("run", str(path), "--results", str(tmp_path / "r"))
    assert out.returncode == 0 and f"exports: {tmp_path / 'r' / 'exports'} (each folder's README.md" in out.stdout
    (p,) = (tmp_path / "r" / "records").glob("*.json")
    rec = json.loads(p.read_text())
    for key in (
        "schema_version",
        "status",
        "config",
        "environment",
        "total_params",
        "trainable_params",
        "trainable_pct",
        "training",
        "peak_rss_bytes",
        "eval_before",
        "eval_after",
        "exports",
        "export_bytes",
        "wall_time_s",
    ):
        assert rec[key] is not None, key
    assert rec["schema_version"] == 2
    training = rec["training"]  # what THE loop measured, typed (harness/records.py::TrainingRecord)
    for key in ("losses", "step_time_stats", "tokens_per_s", "samples_per_s", "peak_live_tensor_bytes", "final_loss"):
        assert training[key] is not None, key
    env = rec["environment"]
    assert env["versions"]["torch"] and env["versions"]["peft"] and env["cpu_model"] and env["git_commit"]
    assert set(training["step_time_stats"]) >= {"count", "mean_s", "median_s", "p90_s", "stdev_s"}
    assert rec["task_info"]["split_sizes"]["train"] == 128 and len(rec["task_info"]["examples_sha256"]["test"]) == 64
    assert not list((tmp_path / "r" / "records").glob(".*.tmp"))  # atomic writes leave no temp files


def test_records_from_a_newer_version_still_load(tmp_path):
    from harness.records import RunRecord

    suite = parse_suite(tiny_suite(), "<t>")
    (rec,) = run_suite(suite, "", tmp_path, quiet=True)
    p = next((tmp_path / "records").glob("*.json"))
    data = json.loads(p.read_text())
    data["a_field_from_the_future"] = 1
    p.write_text(json.dumps(data))
    assert read_record(p).cell_id == rec.cell_id
    assert isinstance(read_record(p), RunRecord)


def test_a_dead_fork_server_falls_back_to_a_fresh_process(tmp_path):
    """The zygote dying (OOM killer, crash) costs the suite nothing: the cell runs in a fresh process."""
    from harness.driver import forkserver
    from harness.driver.executor import run_cell_subprocess

    server = forkserver.ForkServer(dict(os.environ))
    server.proc.kill()
    server.proc.wait()
    (cfg,) = expand(parse_suite(tiny_suite(train={"steps": 2, "batch_size": 8, "max_seq_len": 32}), "<t>"))
    rec = run_cell_subprocess(cfg.model_copy(update={"export": False}), tmp_path, server=server)
    assert rec.status == "ok", rec.error


FROZEN = '''
import gc
from methods.full import Full

class Frozen(Full):
    """Full fine-tuning that fails unless the libraries' objects were frozen out of the collector's way."""
    name = "frozen"
    def prepare(self, model, ctx):
        if gc.get_freeze_count() < 100_000:  # torch, transformers and peft alone make millions
            raise RuntimeError(f"only {gc.get_freeze_count()} objects frozen")
        return super().prepare(model, ctx)
'''


def test_a_cell_runs_with_the_imported_objects_frozen(tmp_path, write_suite):
    """A collection in the cell must not walk the imports' objects (0.3 s of every small cell did, building its
    task's examples): the cell freezes them first, whether forked from the zygote or a process of its own."""
    (tmp_path / "frozen.py").write_text(FROZEN)
    out = run_cli(
        "run", str(write_suite(tiny_suite(methods=[{"method": "frozen.py:Frozen"}]))), "--results", str(tmp_path / "r")
    )
    assert out.returncode == 0, out.stderr[-2000:]


def test_the_zygote_hears_a_cell_end_from_its_pidfd():
    """The zygote sleeps until a request comes or a child ends (no 0.2 s poll per cell): a child's pidfd turns
    readable once it has exited, and not before."""
    import select

    from harness.driver.forkserver import _pidfd

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: waits for its go, then exits
        os.read(r, 1)
        os._exit(3)
    fd = _pidfd(pid)
    if fd is None:
        os.write(w, b"x")
        os.waitpid(pid, 0)
        pytest.skip("this kernel has no pidfd_open: the zygote polls")
    assert select.select([fd], [], [], 0)[0] == []  # still running
    os.write(w, b"x")
    assert select.select([fd], [], [], 60)[0] == [fd]  # 60 s: a guard against hanging, not a timing
    assert os.WEXITSTATUS(os.waitpid(pid, 0)[1]) == 3
    os.close(fd)


def test_cells_run_a_seed_at_a_time_each_round_starting_one_configuration_later():
    """A machine that drifts during a suite must not land on the configurations that happen to run last: within a
    (model, task), seed 0 runs every configuration, then seed 1 starting one configuration later, and so on."""
    methods = [{"method": "full"}, {"method": "lora"}, {"method": "lora", "variant": "r2", "config": {"r": 2}}]
    suite = parse_suite(tiny_suite(methods=methods, seeds=[0, 1, 2, 3]), "<t>")
    order = [(c.method + "/" + c.variant, c.seed) for c in expand(suite)]
    full, lora, r2 = "full/default", "lora/default", "lora/r2"
    assert order == [
        (full, 0), (lora, 0), (r2, 0),
        (lora, 1), (r2, 1), (full, 1),
        (r2, 2), (full, 2), (lora, 2),
        (full, 3), (lora, 3), (r2, 3),
    ]  # fmt: skip
    two_tasks = tiny_suite(tasks=[{"name": "rotten_tomatoes"}, {"name": "bbc_news"}], seeds=[0, 1])
    assert [c.task.name for c in expand(parse_suite(two_tasks, "<t>"))] == ["rotten_tomatoes"] * 2 + ["bbc_news"] * 2


def test_the_exports_of_the_cells_left_are_projected_against_the_free_disk(tmp_path, monkeypatch):
    """Each configuration's first finished cell says what its other seeds will write; one warning, as soon as the
    cells left would write more than the results folder's disk has free."""
    import shutil
    from collections import namedtuple

    from harness.driver.diskwatch import DiskWatch

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(100 * 2**30, 0, 10 * 2**30))  # 10 GiB free
    cells = {f"{m}-s{s}": m for m in ("full", "lora") for s in range(3)}
    watch = DiskWatch(cells, tmp_path)
    assert watch.finished("lora-s0", 2**30) is None  # 2 lora seeds left: 2 GiB
    warning = watch.finished("full-s0", 6 * 2**30)  # + 2 full seeds at 6: 14 GiB in all, over the 10 free
    assert warning.startswith("disk: the 4 cells left would export about 14.0 GiB") and "10.0 GiB free" in warning
    assert watch.finished("full-s1", 6 * 2**30) is None  # said once


def test_run_warns_once_when_the_exports_left_will_not_fit(tmp_path, write_suite, monkeypatch):
    import shutil
    from collections import namedtuple

    real = shutil.disk_usage
    monkeypatch.setattr(
        shutil,
        "disk_usage",
        lambda p: namedtuple("u", "total used free")(*real(p)[:2], 1000),  # 1000 bytes free
    )
    train = {"steps": 1, "batch_size": 4, "max_seq_len": 16, "timing_warmup_steps": 0}
    suite = tiny_suite(seeds=[0, 1], train=train, tasks=[{"name": "rotten_tomatoes", "eval_examples": 16}])
    out = run_cli("run", str(write_suite(suite)), "--results", str(tmp_path / "r"))
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stderr.count("warning: disk: the 1 cells left would export about 0.0 GiB") == 1, out.stderr
