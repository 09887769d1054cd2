"""LoRA (Hu et al. 2021, arXiv 2106.09685) through peft's ``LoraConfig``.

A frozen weight W (d_out × d_in) gets a trainable low-rank update: h = W x + (alpha / r) · B A x, with
A ∈ R^{r × d_in} (random init) and B ∈ R^{d_out × r} (zero init), so training starts from the base model.
Trainable parameters per targeted layer: r · (d_in + d_out); the classification head trains in full.
Any other ``LoraConfig`` field (``use_dora``, ``use_rslora``, ``init_lora_weights``, ...) is passed through
by name and validated by peft when the suite is loaded.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, model_validator

from harness.contract import Export, MemoryModel, MethodBase, ModelContext, register_method
from methods.common import (
    PEFT_RESERVED,
    PeftOptions,
    check_peft_fits,
    export_peft,
    requires_grad_parameters,
    with_heads,
)

if TYPE_CHECKING:
    import torch
    from peft import LoraConfig


@functools.cache
def lora_passthrough() -> list[str]:
    """LoraConfig's own fields a suite may set by name (peft is imported here, not when the file is)."""
    from peft import LoraConfig

    return sorted(
        {f.name for f in dataclasses.fields(LoraConfig)} - PEFT_RESERVED - {"r", "lora_alpha", "lora_dropout"}
    )


class LoraOptions(PeftOptions):
    """Options shared by every LoRA-style method (lora, qlora): named fields plus LoraConfig pass-through."""

    r: int = Field(8, gt=0, description="adapter rank")
    alpha: float = Field(16, gt=0, description="scaling numerator: updates are scaled by alpha / r")
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: list[str] | str | None = Field(None, description="module names, 'all-linear', or peft's default")
    bias: Literal["none", "all", "lora_only"] = "none"

    @model_validator(mode="after")
    def _passthrough_known(self) -> LoraOptions:
        extra = dict(self.model_extra or {})
        if not extra:  # the named fields are typed above; peft is imported only to check keys passed through to it
            return self  # (and LoraConfig itself is built when the method is checked against the model skeleton)
        unknown = sorted(set(extra) - set(lora_passthrough()))
        if unknown:
            raise ValueError(
                f"unknown key {unknown[0]!r}; allowed: r, alpha, dropout, target_modules, bias, or a LoraConfig "
                f"field ({', '.join(lora_passthrough())})"
            )
        try:
            self.lora_config()
        except (TypeError, ValueError) as err:
            raise ValueError(f"LoraConfig rejects these options: {err}") from None
        return self

    def lora_config(self, task_type: str | None = "SEQ_CLS", **overrides: Any) -> LoraConfig:
        from peft import LoraConfig

        return LoraConfig(
            task_type=task_type,
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=self.target_modules,
            bias=self.bias,
            **{**(self.model_extra or {}), **overrides},
        )


def peft_targets(target_modules: list[str] | str | None) -> tuple[str, ...] | str | None:
    """A LoRA config's targets as the estimate reads them: peft's per-architecture default where unset, every
    linear for 'all-linear' (the head aside), else the names given."""
    if target_modules is None:
        return "peft-default"
    if target_modules == "all-linear":
        return None
    return (target_modules,) if isinstance(target_modules, str) else tuple(target_modules)


# LoraConfig fields that choose where and how large the adapters are, not what they compute at the start
LORA_START_UNCHANGED = {
    "use_rslora", "rank_pattern", "alpha_pattern", "layers_to_transform", "layers_pattern", "exclude_modules",
    "modules_to_save",
}  # fmt: skip


@register_method
class Lora(MethodBase):
    """LoRA (Hu et al. 2021) through peft's LoraConfig."""

    name = "lora"
    Config = LoraOptions

    def check_model(self, model: torch.nn.Module, ctx: ModelContext) -> None:
        check_peft_fits(model, self.config.lora_config(task_type=ctx.peft_task_type))

    def prepare(self, model: torch.nn.Module, ctx: ModelContext) -> torch.nn.Module:
        from peft import get_peft_model

        self._load_base = ctx.load_base  # for the adapter's unmerged deployable form
        return get_peft_model(model, with_heads(self.config.lora_config(task_type=ctx.peft_task_type), ctx))

    def trainable_parameters(self, model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
        return requires_grad_parameters(model)

    def memory_model(self) -> MemoryModel:  # rank-r A and B per targeted linear, on a base in the weight dtype
        return MemoryModel(trains="adapters", rank=self.config.r, targets=peft_targets(self.config.target_modules))

    def export(self, model: torch.nn.Module, out_dir: Path) -> list[Export]:
        return export_peft(model, out_dir, mergeable=True, load_base=getattr(self, "_load_base", None))

    def starts_as_base(self) -> bool:
        """B = 0 adds exact zeros to every targeted layer's output. Pass-through options that change the start
        (DoRA's magnitudes, PiSSA / OLoRA / LoftQ inits, which rewrite the base weights) say no."""
        extra = dict(self.config.model_extra or {})
        init = extra.pop("init_lora_weights", True)
        return init in (True, "gaussian") and set(extra) <= LORA_START_UNCHANGED
