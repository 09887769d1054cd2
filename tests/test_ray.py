"""The Ray executor on a local, loopback-only cluster: same records as the local executor; a worker that dies
is a failed record and the suite goes on."""

import json
import textwrap

import pytest

from tests.conftest import run_cli, tiny_suite

pytest.importorskip("ray")

SUITE = dict(
    methods=[{"method": "full"}, {"method": "lora", "config": {"r": 4}}],
    seeds=[0],
    train={"steps": 6, "batch_size": 8, "lr": 1e-3, "max_seq_len": 32, "timing_warmup_steps": 1},
)


def _records(d):
    return {p.name: json.loads(p.read_text()) for p in (d / "records").glob("*.json")}


@pytest.fixture(scope="module")
def one_cluster():
    """The runs below that need no environment of their own run in this process, so they share the one local
    cluster the first of them starts (``RayPool`` joins a running one); it stops when the module ends, and what
    ``ray.init`` set in this process's environment goes with it (else this worker's next `ftbench run` would
    start another zygote: the environment is its key)."""
    from harness.libs import environment_kept

    with environment_kept():
        yield
        import ray

        ray.shutdown()


def test_a_cell_that_kills_its_worker_is_failed(tmp_path, write_suite, one_cluster):
    """A method from a file beside the suite (so the shared cluster's workers need no environment of their own)
    that kills its Ray worker: that cell is a failed record naming Ray, and the other cell still runs."""
    (tmp_path / "killer.py").write_text(
        textwrap.dedent('''
        import os, signal, time
        import psutil
        from methods.full import Full

        class KillWorker(Full):
            """Kills the Ray worker this run is under: its parent (a fresh cell) or grandparent (a fork of the
            worker's zygote)."""
            name = "kill_worker"
            def prepare(self, model, ctx):
                worker = psutil.Process(os.getppid())
                while not " ".join(worker.cmdline()).startswith("ray::"):
                    worker = worker.parent()
                worker.send_signal(signal.SIGKILL)
                # The parent-death signal reaches this process only once the worker has finished exiting,
                # which under load can take long enough for a tiny run to finish and write an ok record.
                time.sleep(300)
                return model
    ''')
    )
    suite = write_suite(tiny_suite(methods=[{"method": "killer.py:KillWorker"}, {"method": "lora"}]))  # beside it
    out = run_cli("run", str(suite), "--results", str(tmp_path / "r"), "--executor", "ray")
    recs = {r["method"]: r for r in _records(tmp_path / "r").values()}
    assert out.returncode == 1, out.stderr[-2000:]
    assert recs["kill_worker"]["status"] == "failed" and recs["kill_worker"]["error"].startswith("ray:")
    assert recs["lora"]["status"] == "ok"


def test_ray_records_equal_local_records(tmp_path, write_suite, one_cluster, monkeypatch):
    path = write_suite(tiny_suite(**SUITE))
    assert run_cli("run", str(path), "--results", str(tmp_path / "local")).returncode == 0
    out = run_cli("run", str(path), "--results", str(tmp_path / "ray"), "--executor", "ray")
    assert out.returncode == 0, out.stderr[-2000:]
    local, ray_ = _records(tmp_path / "local"), _records(tmp_path / "ray")
    assert set(local) == set(ray_) and len(local) == 2
    for name, a in local.items():
        b = ray_[name]
        assert a["status"] == b["status"] == "ok"
        assert a["config"] == b["config"] and a["task_info"] == b["task_info"]
        assert a["trainable_params"] == b["trainable_params"] and a["total_params"] == b["total_params"]
        # Ray gives each cell num_cpus=1 thread: float sums may round differently in the last bits
        assert b["training"]["losses"] == pytest.approx(a["training"]["losses"], rel=1e-5, abs=1e-6)
        assert b["eval_after"]["accuracy"] == a["eval_after"]["accuracy"]
    import harness.driver.ray_executor

    def no_pool(*args, **kwargs):
        raise AssertionError("nothing to run, yet a Ray pool was made")

    monkeypatch.setattr(harness.driver.ray_executor, "RayPool", no_pool)
    resumed = run_cli("run", str(path), "--results", str(tmp_path / "ray"), "--executor", "ray")
    assert resumed.returncode == 0 and "2 already recorded, 0 to run" in resumed.stderr


def test_tuning_on_a_local_ray_cluster_runs_the_studies_side_by_side_with_the_same_proposals(
    tmp_path, write_suite, one_cluster, monkeypatch
):
    """`ftbench tune --executor ray`: each trial a Ray task (its cell in its own process, reporting to the
    study's journal for the median pruner); the two studies' trials are on the cluster at the same time; each
    study proposes what it proposes on the local executor (same sampler seed), and the final runs carry the
    tuning. "At the same time" is what the driver submits, not measured start times: a worker that is still
    importing torch may start its trial after the other's tiny trial ended (CI saw exactly that)."""
    import harness.driver.ray_executor
    from harness.cell.run import run_cell
    from harness.driver.suite import expand, parse_suite
    from harness.driver.tune import tune_cells
    from harness.records import read_record

    data = tiny_suite(methods=[{"method": "full"}, {"method": "lora", "config": {"r": 4}}], seeds=[0])
    data["train"] = {**data["train"], "steps": 4, "eval_every": 2}
    data["export"] = False
    data["tune"] = {"trials": 2, "sampler": "random", "seed": 7, "pruner": "median"}
    in_flight = []

    class Watched(harness.driver.ray_executor.RayPool):
        def submit(self, ticket, cfg, results_dir, show=None):
            super().submit(ticket, cfg, results_dir, show)
            in_flight.append(sorted(c.method for _, c, *_ in self.pending.values()))

    monkeypatch.setattr(harness.driver.ray_executor, "RayPool", Watched)
    out = run_cli("tune", str(write_suite(data)), "--results", str(tmp_path / "ray"), "--executor", "ray")
    assert out.returncode == 0, out.stderr[-3000:]
    trials = [read_record(p) for p in (tmp_path / "ray" / "tuning" / "records").glob("*.json")]
    assert len(trials) == 4 and all(t.status in ("ok", "pruned") for t in trials)

    assert in_flight[:2] == [["full"], ["full", "lora"]]  # both studies' first trials on Ray at once
    # in the study's order (started_at has whole seconds: a study's two tiny trials can start within one)
    by_method = {
        m: sorted((t for t in trials if t.method == m), key=lambda r: r.config["trial"]["number"])
        for m in ("full", "lora")
    }

    suite = parse_suite(data, "<test>")
    local = tune_cells(suite, expand(suite), tmp_path / "local", run_cell, say=lambda _: None)
    for cfg in local:
        proposed = [h["params"]["lr"] for h in cfg.tuning["history"]]
        assert proposed == [t.config["train"]["lr"] for t in by_method[cfg.method]]
    finals = [read_record(p) for p in (tmp_path / "ray" / "records").glob("*.json")]
    assert sorted(r.method for r in finals) == ["full", "lora"]
    assert all(r.status == "ok" and r.config["tuning"]["trials"] == 2 for r in finals)
