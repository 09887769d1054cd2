import json
import os
import shutil
import subprocess
import sys

import pytest
import yaml
from pydantic import BaseModel

from harness.registry import RegistryError, available_methods, describe_config, register_method
from tests.conftest import ROOT, tiny_suite


def _method_class(name, **attrs):
    class Config(BaseModel):
        pass

    body = {
        "name": name,
        "Config": Config,
        "prepare": lambda s, m, c: m,
        "trainable_parameters": lambda s, m: [],
        "on_step_end": lambda s, m, i: None,
        "export": lambda s, m, d: [],
        "report": lambda s, m: {},
        "check_model": lambda s, m: None,
        **attrs,
    }
    return type(f"M_{abs(hash(name))}", (), body)


def test_builtins_registered():
    assert {"full", "lora", "peft"} <= set(available_methods())


@pytest.mark.parametrize("bad", ["", "Lora", "1lora", "lo-ra", "a" * 41, None, 3])
def test_malformed_names_rejected(bad):
    with pytest.raises(RegistryError, match="malformed name"):
        register_method(_method_class(bad))


def test_duplicate_name_rejected():
    available_methods()
    with pytest.raises(RegistryError, match="already registered"):
        register_method(_method_class("lora"))


def test_incomplete_contract_rejected():
    cls = _method_class("halfdone")
    del cls.export
    with pytest.raises(RegistryError, match="lacks export"):
        register_method(cls)


def test_describe_config_lists_fields_types_defaults():
    rows = {r["field"]: r for r in describe_config(available_methods()["lora"].Config)}
    assert rows["r"]["default"] == "8" and rows["r"]["type"] == "int"
    assert "target_modules" in rows


def test_entry_point_plugin_is_registered_and_runs(tmp_path):
    """The README's worked example, installed as a third-party package through the `ftbench.methods`
    entry-point group, is listed by `ftbench methods` and runs a suite: no ftbench file edited."""
    shutil.copy(ROOT / "examples" / "head_only.py", tmp_path / "head_only.py")
    dist = tmp_path / "head_only-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: head-only\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[ftbench.methods]\nhead_only = head_only:HeadOnly\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "COLUMNS": "200", "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-m", "harness", "methods"], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert "head_only" in out.stdout and "train_bias_terms" in out.stdout
    suite = tmp_path / "s.yaml"
    suite.write_text(yaml.safe_dump(tiny_suite(methods=[{"method": "head_only"}])))
    run = subprocess.run(
        [sys.executable, "-m", "harness", "run", str(suite), "--results", str(tmp_path / "r")],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
    )
    assert run.returncode == 0, run.stderr + run.stdout
    (rec,) = (tmp_path / "r" / "records").glob("*.json")
    data = json.loads(rec.read_text())
    assert data["trainable_params"] == 32 * 2 + 2  # tiny-bert head: hidden 32 × 2 labels + bias
    assert data["exports"][0]["kind"] == "head"
