"""Third-party libraries stay quiet and leave the process as they found it (harness/libs.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from harness.libs import MEASUREMENT_ENV, gptqmodel_installed
from tests.conftest import ROOT

# Everything a run imports before and inside a cell: the CLI, the cell, every built-in method, peft's LoRA
# dispatch on a real model (where peft would import gptqmodel), bitsandbytes' 4-bit layers.
RUN_IMPORTS = textwrap.dedent(
    """
    import io, json, os, sys, contextlib
    before = {k: os.environ.get(k) for k in %r}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        import harness.driver.cli
        from harness.libs import quiet_libraries
        quiet_libraries()
        import harness.cell.run, harness.driver.runner, methods
        from harness.registry import build_method
        from harness.contract import ModelContext
        from harness.cell.models import load_model
        loaded = load_model("tiny-llama", 2, 0, False, "prompt", False)
        ctx = ModelContext(task_type="causal_lm", num_labels=2, model_type="llama")
        for name, cfg in [("lora", {"r": 2}), ("qlora", {"r": 2})]:
            build_method(name, cfg).prepare(load_model("tiny-llama", 2, 0, False, "prompt", False).model, ctx)
    after = {k: os.environ.get(k) for k in before}
    print(json.dumps({"before": before, "after": after, "stdout": out.getvalue(),
                      "gptqmodel": sys.modules.get("gptqmodel", "absent") is not None,
                      "torchao": sys.modules.get("torchao", "absent") is not None,
                      "inductor": "torch._inductor.compile_fx" in sys.modules}))
    """
)


def test_a_run_imports_no_library_that_changes_the_environment_or_prints():
    env = {k: v for k, v in os.environ.items() if k not in MEASUREMENT_ENV}
    code = RUN_IMPORTS % (MEASUREMENT_ENV,)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["after"] == got["before"] == dict.fromkeys(MEASUREMENT_ENV)
    assert got["stdout"] == "" and not got["gptqmodel"]  # peft's dispatch did not import it
    assert not got["torchao"]  # nor did transformers' quantizers import gptqmodel's torchao (0.5 s a process)
    assert not got["inductor"]  # bitsandbytes' torch.compile wrappers are built when called: never, here
    assert "GPT-QModel" not in out.stderr and "PYTORCH_ALLOC_CONF" not in out.stderr


@pytest.mark.skipif(not gptqmodel_installed(), reason="needs the optional extra gptqmodel")
def test_importing_gptqmodel_for_a_gptq_cell_puts_its_environment_back():
    code = textwrap.dedent(
        """
        import json, os
        from harness.libs import MEASUREMENT_ENV, hide_gptqmodel, import_gptqmodel_quietly
        hide_gptqmodel()
        before = dict(os.environ)
        (mod,) = import_gptqmodel_quietly("gptqmodel.quantization.gptq")
        import torchao  # gptqmodel's dependency: hidden with it, back with it
        changed = sorted(k for k in set(before) | set(os.environ) if before.get(k) != os.environ.get(k))
        print(json.dumps({"gptq": hasattr(mod, "GPTQ"), "env": {k: os.environ.get(k) for k in MEASUREMENT_ENV},
                          "changed": changed}))
        """
    )
    hf = ("HF_HOME", "HF_HUB_CACHE", "TRANSFORMERS_CACHE", "HF_MODULES_CACHE")  # tokenicer sets them where unset
    env = {**{k: v for k, v in os.environ.items() if k not in MEASUREMENT_ENV + hf}, "OMP_NUM_THREADS": "2"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])  # the banner would be on stdout before this line
    env_now = {**dict.fromkeys(MEASUREMENT_ENV), "OMP_NUM_THREADS": "2"}
    assert got == {"gptq": True, "env": env_now, "changed": []}
    assert len(out.stdout.strip().splitlines()) == 1 and "GPT-QModel" not in out.stderr


def test_torch_compile_wrappers_made_while_bitsandbytes_imports_are_built_at_their_first_call():
    """harness.libs defers what ``torch.compile(fn)`` builds to fn's first call: same result; a build that fails
    leaves the plain function, as bitsandbytes' own fallback does."""
    from harness.libs import _compile_when_called

    built = []

    def fake_compile(fn, **kw):
        built.append(kw)
        if kw.get("fail"):
            raise RuntimeError("no compiler")
        return lambda *a: fn(*a) * 10

    def double(x):
        return 2 * x

    deferred = _compile_when_called(fake_compile, dynamic=False)(double)  # as @torch.compile(dynamic=False)
    assert built == [] and deferred.__name__ == "double"
    assert deferred(3) == 60 and deferred(1) == 20 and built == [{"dynamic": False}]  # built once, when first called
    failing = _compile_when_called(fake_compile, double, fail=True)
    assert failing(3) == 6 and failing(4) == 8 and len(built) == 2  # the plain function, built (and failed) once


def test_a_record_keeps_the_measurement_environment(monkeypatch):
    from harness.environment import environment

    monkeypatch.setenv("PYTORCH_ALLOC_CONF", "expandable_segments:True")
    env = environment()["measurement_env"]
    assert env["PYTORCH_ALLOC_CONF"] == "expandable_segments:True" and set(env) == set(MEASUREMENT_ENV)


def test_environment_kept_undoes_what_was_set_changed_or_removed_inside(monkeypatch):
    from harness.libs import environment_kept

    monkeypatch.setenv("FTBENCH_T_CHANGED", "user")
    monkeypatch.setenv("FTBENCH_T_REMOVED", "user")
    monkeypatch.delenv("FTBENCH_T_ADDED", raising=False)
    before = dict(os.environ)
    with environment_kept():
        os.environ["FTBENCH_T_ADDED"] = "library"
        os.environ["FTBENCH_T_CHANGED"] = "library"
        del os.environ["FTBENCH_T_REMOVED"]
    assert dict(os.environ) == before
