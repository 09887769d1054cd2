"""Helpers shared by the PEFT-based methods (no registered class here)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from harness.registry import Export

# PEFT config fields ftbench sets itself; a suite must not.
PEFT_RESERVED = frozenset(
    {"task_type", "peft_type", "auto_mapping", "base_model_name_or_path", "revision", "inference_mode", "peft_version"}
)


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def save_state_dict(model: torch.nn.Module, path: Path, metadata: dict[str, str] | None = None) -> None:
    """A state dict to safetensors, each storage once: tied weights (a decoder's LM head and its input
    embeddings) are written under their first name only, and the metadata says which names were tied."""
    from safetensors.torch import save_file

    seen: dict[tuple, str] = {}
    tensors, tied = {}, {}
    for k, v in model.state_dict().items():
        if not torch.is_tensor(v):
            continue
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape), v.dtype)
        if key in seen:
            tied[k] = seen[key]
            continue
        seen[key] = k
        tensors[k] = v.detach().contiguous()
    save_file(tensors, path, metadata={**(metadata or {}), "tied": json.dumps(tied)})


def load_state_dict(model: torch.nn.Module, path: Path) -> None:
    """Inverse of :func:`save_state_dict`: strict, except for names the file records as tied."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), "pt") as fh:
        tied = json.loads((fh.metadata() or {}).get("tied", "{}"))
    missing, unexpected = model.load_state_dict(load_file(path), strict=False)
    if unexpected or set(missing) - set(tied):
        raise ValueError(f"{path}: state dict mismatch: missing {sorted(set(missing) - set(tied))}, extra {unexpected}")


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
