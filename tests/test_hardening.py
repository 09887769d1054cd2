"""Inputs that looked harmless and were not: pickle weights, a model's own code at validation, the hub contacted
from an "offline" run, a relative model path as a cell's identity, Ctrl-C while Python starts."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from harness.cell.models import _tiny_config, load_model, resolve_mode
from harness.cell.run import run_cell
from harness.driver.suite import expand, parse_suite
from harness.schema import ConfigError
from tests.conftest import ROOT, cells, tiny_suite


def _pickled_model(path):
    import torch
    from transformers import AutoModelForSequenceClassification

    config = _tiny_config("tiny-bert", 2)
    config.save_pretrained(path)
    torch.save(AutoModelForSequenceClassification.from_config(config).state_dict(), path / "pytorch_model.bin")
    assert (path / "pytorch_model.bin").is_file() and not list(path.glob("*.safetensors"))
    return str(path)


def test_pickle_weights_need_an_explicit_opt_in_and_the_record_says_so(tmp_path):
    path = _pickled_model(tmp_path / "m")
    with pytest.raises(ConfigError, match=r"models\[0\]\.name: .* holds pickle weights only \(pytorch_model\.bin\)"):
        parse_suite(tiny_suite(models=[path]), "s.yaml")
    with pytest.raises(ConfigError, match="allow_pickle: true"):
        load_model(path, 2, 0)  # the loader refuses too, whatever called it
    cfg = cells(models=[{"name": path, "allow_pickle": True}], export=False)[0]
    rec = run_cell(cfg, tmp_path / "r")
    assert rec.status == "ok", rec.error
    assert rec.model_info["weights_format"] == "pickle" and rec.model_info["allow_pickle"] is True
    assert rec.config["model"]["allow_pickle"] is True


def test_validation_never_runs_a_models_own_code(tmp_path):
    model = tmp_path / "custom"
    model.mkdir()
    marker = tmp_path / "ran"
    code = f"open({str(marker)!r}, 'w').write('x')\nfrom transformers import PretrainedConfig\n"
    code += "class EvilConfig(PretrainedConfig):\n    model_type = 'evil'\n"
    (model / "configuration_evil.py").write_text(code)
    (model / "modeling_evil.py").write_text(code)
    auto = {"AutoConfig": "configuration_evil.EvilConfig", "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    config = {"architectures": ["EvilForCausalLM"], "model_type": "evil", "auto_map": auto}
    (model / "config.json").write_text(json.dumps(config))
    (model / "model.safetensors").write_bytes(b"")  # weights are not read at validation; a folder needs some
    spec = {"name": str(model), "trust_remote_code": True}
    suite = parse_suite(tiny_suite(models=[spec], tasks=[{"name": "piqa"}]), "s.yaml")
    assert not marker.exists()  # the model's code did not run in the runner
    assert resolve_mode(str(model), "auto", True) == "prompt"  # read from config.json as data
    assert len(expand(suite)) == 1


def test_a_model_path_is_its_folder_and_what_it_holds_not_its_text(tmp_path, monkeypatch):
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
        _tiny_config("tiny-bert", 2).save_pretrained(tmp_path / d / "m")
        (tmp_path / d / "m" / "model.safetensors").write_bytes(b"x" * (10 if d == "a" else 20))

    def cell_in(d):
        monkeypatch.chdir(tmp_path / d)
        return cells(models=["./m"])[0]

    a, b = cell_in("a"), cell_in("b")
    assert a.model.name == str((tmp_path / "a" / "m").resolve()) and not a.cell_id.startswith(".")
    assert a.cell_id.startswith("m__rotten_tomatoes__lora-default__s0__")
    assert a.cell_id != b.cell_id  # the same text "./m", another folder
    (tmp_path / "a" / "m" / "model.safetensors").write_bytes(b"y" * 30)
    assert cell_in("a").cell_id != a.cell_id  # the same folder holding other weights
    assert a.model_fingerprint and a.model_fingerprint != b.model_fingerprint


_GUARD = """
import socket, sys
attempts = []
def refuse(self, address):
    attempts.append(address)
    raise OSError("network refused by the test")
socket.socket.connect = refuse
socket.socket.connect_ex = refuse
from harness.driver.cli import main
rc = main(sys.argv[1:])
print("CONNECT ATTEMPTS:", attempts)
sys.exit(rc)
"""


def test_validation_of_a_cached_hub_id_makes_no_network_connection(tmp_path):
    """A hub id in the local cache: its config is read during validation. Offline, that is a file read."""
    hub = tmp_path / "hub" / "models--someorg--tiny"
    (hub / "refs").mkdir(parents=True)
    (hub / "refs" / "main").write_text("0" * 40)
    snapshot = hub / "snapshots" / ("0" * 40)
    _tiny_config("tiny-bert", 2).save_pretrained(snapshot)
    suite = tmp_path / "s.yaml"  # a target module the model lacks: validation reads the config, then stops
    suite.write_text(
        json.dumps(
            tiny_suite(models=["someorg/tiny"], methods=[{"method": "lora", "config": {"target_modules": ["nope"]}}])
        )
    )
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")
    }
    env.update(HF_HUB_CACHE=str(tmp_path / "hub"), FTBENCH_FORKSERVER="0")
    out = subprocess.run(
        [sys.executable, "-c", _GUARD, "run", str(suite), "--results", str(tmp_path / "r")],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=300,
    )
    assert out.returncode == 2, out.stderr[-2000:]
    assert "no module named 'nope'" in out.stderr  # validation got as far as the model's architecture
    assert "CONNECT ATTEMPTS: []" in out.stdout, out.stdout


@pytest.mark.skipif(
    signal.getsignal(signal.SIGINT) is signal.SIG_IGN,
    reason="this test process was started with SIGINT ignored (a background job): there the interrupt does not "
    "reach the child's handler reliably; the behaviour is checked wherever pytest runs in the foreground",
)
def test_ctrl_c_while_python_starts_is_one_line(tmp_path):
    """... and leaves no folder behind: at 1.5 s the suite's checks usually run in the zygote, whose request
    folder (ftbench-call-*) was left in the temporary directory by every such Ctrl-C."""
    suite, tmp = tmp_path / "s.yaml", tmp_path / "tmp"
    suite.write_text(json.dumps(tiny_suite()))
    tmp.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-m", "harness", "run", str(suite), "--results", str(tmp_path / "r")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={**os.environ, "TMPDIR": str(tmp)},
    )
    time.sleep(1.5)  # importing torch, transformers and peft for validation takes several seconds
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "interrupted" in lines[0], err
    assert proc.returncode == 130, (proc.returncode, err)
    assert not list(tmp.glob("ftbench-call-*"))
