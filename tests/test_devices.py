"""Tensors a method makes while it runs land on the model's device: a CPU tensor meeting a CUDA model fails
every GPU run (the QA-LoRA export once compared its models on a CPU batch). A guard over methods/: every tensor
factory call outside a module's constructor names its device."""

from __future__ import annotations

import ast
from pathlib import Path

import torch

from methods.intquant import pack, unpack

ROOT = Path(__file__).resolve().parents[1]
FACTORIES = {"randint", "ones", "zeros", "full", "arange", "tensor", "randn", "rand", "empty", "eye", "linspace"}


def _device_free_factory_calls(path: Path) -> list[str]:
    out = []
    tree = ast.parse(path.read_text())
    for fn in ast.walk(tree):
        if not isinstance(fn, ast.FunctionDef) or fn.name == "__init__":  # buffers are made, then moved with the module
            continue
        for node in ast.walk(fn):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in FACTORIES
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "torch"
                and not any(k.arg == "device" for k in node.keywords)
            ):
                out.append(f"{path.name}:{node.lineno} torch.{node.func.attr} in {fn.name}")
    return out


def test_every_tensor_a_method_makes_names_its_device():
    found = [c for p in sorted((ROOT / "methods").glob("*.py")) for c in _device_free_factory_calls(p)]
    assert found == []


def test_the_guard_sees_a_device_free_factory(tmp_path):
    bad = tmp_path / "probe.py"
    bad.write_text("import torch\n\ndef f(x):\n    return x + torch.ones(3)\n")
    assert _device_free_factory_calls(bad) == ["probe.py:4 torch.ones in f"]


def test_bit_packing_follows_its_input_device():
    q = torch.randint(0, 16, (64,), dtype=torch.uint8, device="meta")
    packed = pack(q, 4)  # on the meta device: a CPU tensor in the arithmetic would raise here
    assert packed.device.type == "meta" and unpack(packed, 4, 64).device.type == "meta"
