"""The driver's steps that need torch run in a fork of the cells' zygote (harness/driver/torchside.py): the
``ftbench`` process itself never imports torch, and what those steps find is said as before."""

from __future__ import annotations

import os
import subprocess
import sys
import types

import pytest
import yaml

from harness.driver import forkserver, torchside
from harness.schema import ConfigError
from tests.conftest import ROOT, tiny_suite

PICKY = '''
from harness.contract import MethodBase


class Picky(MethodBase):
    """Refuses BERT: its check runs where the skeleton is built, so this file must be registered there too."""

    name = "picky"

    def check_model(self, model, ctx):
        if ctx.model_type == "bert":
            raise ValueError("picky refuses bert")

    def prepare(self, model, ctx):
        return model

    def trainable_parameters(self, model):
        return [(n, p) for n, p in model.named_parameters() if n.startswith("classifier")]
'''


def test_a_check_in_the_zygote_registers_the_suites_method_file_and_says_what_it_found(tmp_path):
    """As `ftbench run` does it: the driver never imports torch; a method from a file beside the suite refused by
    its skeleton check is one line, exit 2, nothing written. (A run that passes its checks and never imports torch:
    tests/test_registry.py.)"""
    (tmp_path / "picky.py").write_text(PICKY)
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(tiny_suite(methods=[{"method": "picky.py:Picky"}])))
    script = (
        "import sys; from harness.driver.cli import main\n"
        f"rc = main(['run', {str(bad)!r}, '--results', {str(tmp_path / 'r')!r}])\n"
        "print(rc, 'torch' in sys.modules, 'transformers' in sys.modules)"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=300, env=env)
    assert run.stdout.strip() == "2 False False", run.stdout + run.stderr
    assert run.stderr.strip() == (
        f"ftbench: error: {bad}: methods[0].config: picky refuses bert (model tiny-bert, method picky/default)"
    )
    assert not (tmp_path / "r").exists()


def test_a_call_in_the_zygote_returns_its_value_and_raises_what_was_raised(tmp_path):
    server = forkserver.server_for(allow_network=False)  # the test session's zygote
    (tmp_path / "one").mkdir()
    assert server.call("json:dumps", {"obj": [1, "x"]}, tmp_path / "one") == '[1, "x"]'
    bad = tiny_suite(methods=[{"method": "lora", "config": {"r": 4, "target_modules": ["nosuch"]}}])
    from harness.driver.suite import check_cheap

    (tmp_path / "two").mkdir()
    with pytest.raises(ConfigError, match=r"s.yaml: methods\[0\].config.target_modules: no module named 'nosuch'"):
        kwargs = {"suite_json": check_cheap(bad, "s.yaml").model_dump_json(), "source": "s.yaml"}
        server.call("harness.driver.suite:check_fit_sent", kwargs, tmp_path / "two")
    (tmp_path / "three").mkdir()
    with pytest.raises(forkserver.CallFailed, match=r"(?s)TypeError: .*in a fork of the cells' zygote.*Traceback"):
        server.call("json:dumps", {"nosuch": 1}, tmp_path / "three")


def test_where_the_zygote_has_died_the_step_runs_here(monkeypatch):
    class Dead:
        env = forkserver.cell_env(False)
        proc = types.SimpleNamespace(poll=lambda: -9)

        def call(self, *args):
            raise RuntimeError("the cell fork server exited (code -9)")

    monkeypatch.setattr(forkserver, "running", lambda: [Dead()])
    monkeypatch.delitem(sys.modules, "torch")  # as in `ftbench`, which has not imported it
    assert torchside.call("json:dumps", False, obj=[1]) == "[1]"
