"""Full fine-tuning: every parameter trains (optionally keeping the embeddings frozen)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import Field

from harness.contract import Export, MemoryModel, MethodBase, ModelContext, register_method
from harness.schema import Strict
from methods.common import dir_bytes, pretrained_forms, requires_grad_parameters

if TYPE_CHECKING:
    import torch


@register_method
class Full(MethodBase):
    """Full fine-tuning: every parameter trains."""

    name = "full"

    class Config(Strict):
        freeze_embeddings: bool = Field(False, description="keep the input embedding matrix frozen")

    def prepare(self, model: torch.nn.Module, ctx: ModelContext) -> torch.nn.Module:
        for p in model.parameters():
            p.requires_grad_(True)
        if self.config.freeze_embeddings:
            model.get_input_embeddings().weight.requires_grad_(False)
        return model

    def trainable_parameters(self, model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
        return requires_grad_parameters(model)

    def starts_as_base(self) -> bool:
        return True  # nothing is changed before training

    def memory_model(self) -> MemoryModel:
        return MemoryModel(trains="all")

    def export(self, model: torch.nn.Module, out_dir: Path) -> list[Export]:
        path = out_dir / "model"
        model.save_pretrained(path, safe_serialization=True)
        notes = "the trained weights as they are: served, they score as trained"
        return [Export("full", path, dir_bytes(path), notes=notes, deploy=pretrained_forms(path, type(model)))]
