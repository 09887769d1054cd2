"""What a practitioner reached for (issue 31): ``--only``, ``--device``, ``--jobs`` and a method from a file beside
the suite (``method: file.py:Class``)."""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml

from harness.driver.runner import select_cells
from harness.records import read_record
from tests.conftest import cells, run_cli, tiny_suite

DATA = Path(__file__).parent / "data"
TWO_METHODS = [{"method": "lora", "config": {"r": 4}}, {"method": "full"}]


def _write(folder: Path, **over) -> Path:
    path = folder / "suite.yaml"
    path.write_text(yaml.safe_dump(tiny_suite(**over)))
    return path


def _records(results: Path) -> list:
    return [read_record(p) for p in sorted((results / "records").glob("*.json"))]


# --- --only ------------------------------------------------------------------------------------------------------


def test_only_matches_whole_parts_of_the_cell_key():
    grid = cells(
        methods=[
            {"method": "lora", "config": {"r": 4}},
            {"method": "lora", "variant": "r8", "config": {"r": 8}},
            {"method": "qlora", "config": {"r": 4}},
        ],
        seeds=[0, 1],
    )
    pick = lambda *p: sorted(f"{c.method}/{c.variant}/{c.seed}" for c in select_cells(grid, list(p)))  # noqa: E731
    assert pick("lora") == ["lora/default/0", "lora/default/1", "lora/r8/0", "lora/r8/1"]  # not qlora's cells
    assert pick("lora/r8") == ["lora/r8/0", "lora/r8/1"]
    assert pick("*/1") == ["lora/default/1", "lora/r8/1", "qlora/default/1"]
    assert pick("tiny-bert/rotten_tomatoes/qlora/default/0") == ["qlora/default/0"]
    assert pick("qlora", "r8") == ["lora/r8/0", "lora/r8/1", "qlora/default/0", "qlora/default/1"]
    assert pick("nosuch") == []


def test_only_runs_the_matching_cells_and_a_later_run_adds_the_rest(tmp_path):
    suite, results = _write(tmp_path, methods=TWO_METHODS), tmp_path / "r"
    out = run_cli("run", str(suite), "--results", str(results), "--only", "full")
    assert out.returncode == 0, out.stderr
    assert [r.method for r in _records(results)] == ["full"]
    out = run_cli("run", str(suite), "--results", str(results))
    assert out.returncode == 0, out.stderr
    assert sorted(r.method for r in _records(results)) == ["full", "lora"]
    assert "1 already recorded, 1 to run" in out.stderr  # the full cell was not run again


def test_only_that_matches_nothing_is_one_line_listing_the_cells(tmp_path):
    out = run_cli("run", str(_write(tmp_path)), "--results", str(tmp_path / "r"), "--only", "nosuch")
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
    assert "matches no cell; cells are tiny-bert/rotten_tomatoes/lora/default/0" in out.stderr
    assert not (tmp_path / "r").exists()


# --- --device ----------------------------------------------------------------------------------------------------


def test_device_is_checked_before_anything_runs(tmp_path):
    suite = _write(tmp_path)
    for device, want in [("gpu", "--device gpu: allowed: cpu, cuda, cuda:N"), ("cuda:99", "this machine has")]:
        out = run_cli("run", str(suite), "--results", str(tmp_path / "r"), "--device", device)
        assert out.returncode == 2 and want in out.stderr and out.stderr.count("\n") == 1, out.stderr
    assert not (tmp_path / "r").exists()


def test_device_cpu_runs_there_and_is_part_of_the_cell(tmp_path):
    suite, results = _write(tmp_path), tmp_path / "r"
    out = run_cli("run", str(suite), "--results", str(results), "--device", "cpu")
    assert out.returncode == 0, out.stderr
    (rec,) = _records(results)
    assert rec.config["device"] == "cpu" and rec.status == "ok"
    assert "cpu" in rec.environment.get("device", "cpu")
    # the same suite without --device is another cell (where CUDA is present it would run elsewhere)
    out = run_cli("run", str(suite), "--results", str(results))
    assert "config changed, rerunning" in out.stderr and "device 'cpu' → None" in out.stderr, out.stderr


# --- --jobs ------------------------------------------------------------------------------------------------------


MEET = """
import os, time
from pathlib import Path
from methods.full import Full

HERE = Path({here!r})

class Meet(Full):
    \"\"\"Full fine-tuning that first waits for a second cell to reach the same point: alone, it fails.\"\"\"
    name = "meet"
    def prepare(self, model, ctx):
        (HERE / f"arrived-{{os.getpid()}}").touch()
        for _ in range(1200):
            if len(list(HERE.glob("arrived-*"))) >= 2:
                return super().prepare(model, ctx)
            time.sleep(0.1)
        raise RuntimeError("no other cell ran at the same time")
"""


def test_jobs_runs_cells_side_by_side_with_the_cores_split_and_flags_their_timings(tmp_path):
    """Two cells meet inside ``prepare`` (each waits for the other): they can only both finish if they ran at
    once. No clock is read, so a slow machine cannot fail it."""
    import os

    (tmp_path / "meet.py").write_text(MEET.format(here=str(tmp_path)))
    suite, results = _write(tmp_path, methods=[{"method": "meet.py:Meet"}], seeds=[0, 1]), tmp_path / "r"
    out = run_cli("run", str(suite), "--results", str(results), "--jobs", "2")
    assert out.returncode == 0, out.stderr
    recs = _records(results)
    assert len(recs) == 2 and all(r.status == "ok" for r in recs), [r.error for r in recs]
    assert len(list(tmp_path.glob("arrived-*"))) == 2
    assert all(r.contention["concurrent_cells"] == 2 and r.contention["loaded"] for r in recs)
    assert {r.environment["torch_threads"] for r in recs} == {max(1, (os.cpu_count() or 1) // 2)}
    assert "⚠ under load (2 cells side by side, --jobs)" in run_cli("report", str(results), "--format", "md").stdout


def test_jobs_out_of_range_or_on_ray_is_refused(tmp_path):
    suite = _write(tmp_path)
    for extra, want in [(["--jobs", "0"], "--jobs 0: allowed: 1 to"), (["--jobs", "999"], "allowed: 1 to")]:
        out = run_cli("run", str(suite), "--results", str(tmp_path / "r"), *extra)
        assert out.returncode == 2 and want in out.stderr, out.stderr


# --- a method from a file beside the suite ----------------------------------------------------------------------


def test_a_method_from_a_file_beside_the_suite_runs_next_to_a_builtin(tmp_path):
    shutil.copy(DATA / "methods" / "bitfit.py", tmp_path / "bitfit.py")
    methods = [{"method": "bitfit.py:BitFit"}, {"method": "lora", "config": {"r": 4}}]
    suite, results = _write(tmp_path, methods=methods), tmp_path / "r"
    out = run_cli("run", str(suite), "--results", str(results), "--jobs", "1")
    assert out.returncode == 0, out.stderr
    by = {r.method: r for r in _records(results)}
    assert set(by) == {"bitfit", "lora"} and by["bitfit"].status == "ok", by["bitfit"].error
    assert by["bitfit"].config["method_source"] == f"{tmp_path / 'bitfit.py'}:BitFit"
    # biases and the head only: fewer than LoRA's adapters + head, and it learned something
    assert 0 < by["bitfit"].trainable_params < by["lora"].trainable_params
    assert by["bitfit"].training.losses[-1] != by["bitfit"].training.losses[0]
    # `module:Class` names the same file
    same = _write(tmp_path, methods=[{"method": "bitfit:BitFit"}])
    out = run_cli("run", str(same), "--results", str(results))
    assert out.returncode == 0 and "1 cells, 1 already recorded, 0 to run" in out.stderr, out.stderr
