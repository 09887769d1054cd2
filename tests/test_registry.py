import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import yaml

from harness.contract import MethodBase
from harness.registry import RegistryError, available_methods, describe_config, register_method
from tests.conftest import ROOT, tiny_suite


def _method_class(name, base=MethodBase, **attrs):
    body = {"name": name, "prepare": lambda s, m, c: m, "trainable_parameters": lambda s, m: [], **attrs}
    return type(f"M_{abs(hash(name))}", (base,), body)


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
    del cls.prepare
    with pytest.raises(RegistryError, match="lacks prepare"):
        register_method(cls)
    # A class that does not take MethodBase's defaults must write every hook; the error says where they are.
    plain = _method_class("plain", base=object, Config=MethodBase.Config)
    with pytest.raises(RegistryError, match=r"lacks check_model, param_groups.*subclass harness.contract.MethodBase"):
        register_method(plain)


def test_minimal_method_gets_the_defaults():
    m = _method_class("minimal_defaults")()
    assert m.config == MethodBase.Config() and m.compute_dtype() is None and m.optimizer([], 1e-3, 0.0) is None
    p = torch.nn.Parameter(torch.zeros(2))
    assert m.param_groups([("w", p)], 1e-3) == [{"params": [p], "name": "all"}]


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
    suite = tmp_path / "s.yaml"
    suite.write_text(yaml.safe_dump(tiny_suite(methods=[{"method": "head_only"}])))
    # One fresh interpreter (that is what sees the entry point) for both commands: each costs ~12 s of imports.
    # The run's checks and machine facts ran in a fork of its zygote, with the method registered there too, and
    # this process, as `ftbench` would, never imported torch (harness/driver/torchside.py).
    script = (
        "import sys; from harness.driver.cli import main; rc = main(['methods']); print('=' * 8, flush=True); "
        f"rc = rc or main(['run', {str(suite)!r}, '--results', {str(tmp_path / 'r')!r}]); "
        "print('torch imported:', 'torch' in sys.modules); sys.exit(rc)"
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=ROOT)
    assert run.returncode == 0, run.stderr + run.stdout
    assert run.stdout.strip().endswith("torch imported: False") and run.stderr.startswith("hardware: "), run.stderr
    listing = run.stdout.split("=" * 8)[0]
    assert "head_only" in listing
    code = [ln for ln in (ROOT / "examples" / "head_only.py").read_text().split('"""')[-1].splitlines() if ln.strip()]
    assert len(code) <= 15  # the whole method: an import, a name, prepare and trainable_parameters
    (rec,) = (tmp_path / "r" / "records").glob("*.json")
    data = json.loads(rec.read_text())
    assert data["trainable_params"] == 32 * 2 + 2  # tiny-bert head: hidden 32 × 2 labels + bias
    assert data["exports"][0]["kind"] == "trained"  # MethodBase's export: the trained parameters
    assert data["eval_after"]["accuracy"] is not None and data["training"]["optimizer"] == "adamw"


def test_a_plugin_that_fails_to_import_is_set_aside_and_named_where_it_is_used(tmp_path, monkeypatch, capsys):
    """One broken package in the `ftbench.methods` group stopped every command (`ftbench methods`, any suite) with
    a ModuleNotFoundError that named neither the plug-in nor its package."""
    from harness import registry
    from harness.driver.cli import main

    dist = tmp_path / "broken-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: broken\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[ftbench.methods]\nbroken = broken_method:Broken\n")
    (tmp_path / "broken_method.py").write_text("import a_library_not_installed\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "_loaded", False)
    monkeypatch.setattr(registry, "_BROKEN", {})
    why = "the plug-in broken_method:Broken (package broken 0.1) did not load: ModuleNotFoundError"
    assert registry.broken_plugins()["broken"].startswith(why) and "lora" in available_methods()
    with pytest.raises(RegistryError, match="method 'broken': the plug-in broken_method:Broken"):
        registry.get_method("broken")
    assert main(["methods", "full"]) == 0  # every other command still works
    for name in ("ok", "broken"):
        suite = tmp_path / f"{name}.yaml"
        suite.write_text(yaml.safe_dump(tiny_suite(methods=[{"method": "broken" if name == "broken" else "full"}])))
        assert main(["run", str(suite), "--results", str(tmp_path / name), "--dry-run"]) == (
            2 if name == "broken" else 0
        )
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"ftbench: error: {tmp_path / 'broken.yaml'}: methods[0].method: 'broken': {why}"), err
