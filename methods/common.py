"""Helpers shared by the PEFT-based methods (no registered class here)."""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from harness.registry import Export

# PEFT config fields ftbench sets itself; a suite must not.
PEFT_RESERVED = frozenset(
    {"task_type", "peft_type", "auto_mapping", "base_model_name_or_path", "revision", "inference_mode", "peft_version"}
)


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def requires_grad_parameters(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def export_peft(model: torch.nn.Module, out_dir: Path, mergeable: bool) -> list[Export]:
    """Adapter in PEFT format (adapter_model.safetensors + adapter_config.json); where the tuner can merge,
    also the merged full model, returned in memory so the runner can measure merge fidelity."""
    out = [Export("adapter", out_dir / "adapter", 0)]
    model.save_pretrained(out[0].path, safe_serialization=True)
    out[0].bytes_on_disk = dir_bytes(out[0].path)
    if mergeable:
        merged = copy.deepcopy(model).merge_and_unload()
        path = out_dir / "merged"
        merged.save_pretrained(path, safe_serialization=True)
        out.append(Export("merged", path, dir_bytes(path), model=merged))
    return out
