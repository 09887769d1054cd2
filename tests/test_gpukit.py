"""The offline GPU bundle and check (gpu/): built here, installed offline into a fresh folder, every stage of
gpu/check.sh run on CPU with tiny shapes. What the GPU machine's image lacks (optuna, gguf, ray, gptqmodel) is
made to fail on import, and the bundle comes first on the path, so its pydantic, peft, plotly and bitsandbytes
are the ones used. Needs the package registry to build the bundle (as `make setup` does)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.conftest import ROOT

MISSING_ON_THE_IMAGE = ("optuna", "gguf", "ray", "gptqmodel")


def test_the_bundle_fits_and_the_cpu_dry_run_of_the_gpu_check_passes_from_it(tmp_path):
    kit, out, shadow = tmp_path / "kit", tmp_path / "out", tmp_path / "shadow"
    built = subprocess.run(
        [sys.executable, "gpu/bundle.py", "--out", str(kit)], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert built.returncode == 0, built.stdout + built.stderr
    assert "MiB of 60 MiB allowed" in built.stdout
    manifest = json.loads((kit / "manifest.json").read_text())
    assert manifest["total_mib"] <= 60 and "3.12" in manifest["pythons"]
    assert sorted(p.name for p in (kit / "extra" / "bitsandbytes").glob("*.so")) == [
        "libbitsandbytes_cpu.so",
        "libbitsandbytes_cuda130.so",
    ]
    for name in MISSING_ON_THE_IMAGE:
        (shadow / name).mkdir(parents=True)
        (shadow / name / "__init__.py").write_text(f"raise ImportError('{name} is not on the GPU image')\n")
    env = {**os.environ, "FTBENCH_GPUKIT": str(kit), "FTBENCH_EXTRA_PATH": str(shadow), "PYTHON": sys.executable}
    done = subprocess.run(
        ["bash", "gpu/check.sh", str(out), "--device", "cpu", "--tiny"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    summary = (out / "summary.txt").read_text()
    assert done.returncode == 0, summary
    stages = (out / "stages.txt").read_text().splitlines()
    assert [s.split()[0] for s in stages] == ["install", "probe", "pytest", "suite", "report"]
    assert all(" ok " in s for s in stages), stages
    probe = json.loads((out / "probe.json").read_text())
    for name in ("pydantic", "peft", "plotly", "bitsandbytes"):  # from the bundle, not from this venv
        assert probe["versions"][name]["from"].startswith(str(out / "site")), probe["versions"][name]
    assert probe["nf4_matmul"]["ok"] and probe["paged_adamw_8bit"]["stepped"]
    assert probe["bitsandbytes_binary"]["library"].endswith("libbitsandbytes_cpu.so")
    assert (out / "results" / "report.html").is_file() and "random weights: memory and speed only" in " ".join(
        summary.split()
    )
    records = sorted((out / "results" / "records").glob("*.json"))
    assert len(records) == 4
    for path in records:
        r = json.loads(path.read_text())
        assert r["status"] == "ok" and r["model_info"]["weights"] == "random" and r["eval_after"] is None
        assert r["estimate"]["peak_bytes"] > 0 and ("not_measured" in r["energy"] or "joules" in r["energy"])
