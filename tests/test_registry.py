import subprocess
import sys
import textwrap

import pytest
from pydantic import BaseModel

from harness.registry import RegistryError, available_methods, describe_config, register_method


def _method_class(name, **attrs):
    class Config(BaseModel):
        pass

    body = {"name": name, "Config": Config, "prepare": lambda s, m, c: m, "trainable_parameters": lambda s, m: [],
            "on_step_end": lambda s, m, i: None, "export": lambda s, m, d: [], **attrs}
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


def test_entry_point_plugin_is_registered(tmp_path):
    """A third-party package registers through the `ftbench.methods` entry-point group, with no ftbench edit."""
    (tmp_path / "myplugin.py").write_text(textwrap.dedent('''
        from methods.full import Full
        class Frozen:
            """Train nothing but the classifier head."""
            name = "head_only"
            Config = Full.Config
            def __init__(self, config): self.config = config
            def prepare(self, model, ctx):
                for n, p in model.named_parameters():
                    p.requires_grad_(n.split(".")[0] in ctx.head_names)
                return model
            def trainable_parameters(self, model):
                return [(n, p) for n, p in model.named_parameters() if p.requires_grad]
            def on_step_end(self, model, step): pass
            def export(self, model, out_dir): return []
    '''))
    dist = tmp_path / "myplugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: myplugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[ftbench.methods]\nhead_only = myplugin:Frozen\n")
    out = subprocess.run([sys.executable, "-m", "harness", "methods"], capture_output=True, text=True,
                         env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin", "COLUMNS": "200"})
    assert out.returncode == 0, out.stderr
    assert "head_only" in out.stdout and "lora" in out.stdout
