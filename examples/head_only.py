"""A complete third-party method in one file: train only the classification head ("linear probing").

Register it from your own package's pyproject.toml:

    [project.entry-points."ftbench.methods"]
    head_only = "head_only:HeadOnly"

or, inside ftbench, put the file in methods/, decorate the class with @register_method and import it in
methods/__init__.py. Then use it in a suite as `- method: head_only`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field
from safetensors.torch import save_file

from harness.registry import Export, ModelContext


class HeadOnly:
    """Linear probe: the pretrained body stays frozen, only the head trains."""

    name = "head_only"

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid", frozen=True)
        train_bias_terms: bool = Field(False, description="also train every bias (BitFit-style)")

    def __init__(self, config: Config) -> None:
        self.config = config

    def check_model(self, model: torch.nn.Module) -> None:
        pass

    def prepare(self, model: torch.nn.Module, ctx: ModelContext) -> torch.nn.Module:
        for name, p in model.named_parameters():
            in_head = name.split(".")[0] in ctx.head_names
            p.requires_grad_(in_head or (self.config.train_bias_terms and name.endswith(".bias")))
        return model

    def trainable_parameters(self, model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
        return [(n, p) for n, p in model.named_parameters() if p.requires_grad]

    def on_step_end(self, model: torch.nn.Module, step: int) -> None:
        pass

    def report(self, model: torch.nn.Module) -> dict:
        return {}

    def export(self, model: torch.nn.Module, out_dir: Path) -> list[Export]:
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / "head.safetensors"
        save_file({n: p.detach().contiguous() for n, p in self.trainable_parameters(model)}, path)
        return [Export("head", path, path.stat().st_size)]
