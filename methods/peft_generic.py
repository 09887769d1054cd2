"""Any PEFT method by ``peft_type`` plus that config's own fields (IA3, prompt tuning, prefix tuning, LoHa,
LoKr, VeRA, BOFT, ...): most PEFT methods need no ftbench code at all.

Example suite entry::

    - method: peft
      variant: ia3
      config: {peft_type: IA3, target_modules: [key, value, output.dense], feedforward_modules: [output.dense]}
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from peft import PEFT_TYPE_TO_CONFIG_MAPPING, TaskType, get_peft_model
from peft.tuners.tuners_utils import BaseTuner
from pydantic import Field, field_validator, model_validator

from harness.registry import Export, ModelContext, register_method
from methods.common import (
    PEFT_RESERVED,
    PeftOptions,
    check_peft_fits,
    export_peft,
    requires_grad_parameters,
    task_type_of,
)

PEFT_TYPES = sorted(str(k.value if hasattr(k, "value") else k) for k in PEFT_TYPE_TO_CONFIG_MAPPING)


def _config_class(peft_type: str):
    return next(v for k, v in PEFT_TYPE_TO_CONFIG_MAPPING.items() if str(getattr(k, "value", k)) == peft_type)


@register_method
class PeftGeneric:
    """Any PEFT method by peft_type plus that config's own fields."""

    name = "peft"

    class Config(PeftOptions):
        peft_type: str = Field(description=f"one of {', '.join(PEFT_TYPES)}; other keys are that config's fields")

        @field_validator("peft_type")
        @classmethod
        def _known(cls, v: str) -> str:
            if v.upper() not in PEFT_TYPES:
                raise ValueError(f"unknown peft_type {v!r}; allowed: {', '.join(PEFT_TYPES)}")
            return v.upper()

        @model_validator(mode="after")
        def _fields_known(self):
            cls = _config_class(self.peft_type)
            allowed = sorted({f.name for f in dataclasses.fields(cls)} - PEFT_RESERVED)
            unknown = sorted(set(self.model_extra or {}) - set(allowed))
            if unknown:
                raise ValueError(f"unknown key {unknown[0]!r} for {self.peft_type}; allowed: {', '.join(allowed)}")
            try:
                self.peft_config()
            except (TypeError, ValueError) as err:
                raise ValueError(f"{cls.__name__} rejects these options: {err}") from None
            return self

        def peft_config(self, task_type: str = TaskType.SEQ_CLS):
            return _config_class(self.peft_type)(task_type=task_type, **(self.model_extra or {}))

    def __init__(self, config: Config) -> None:
        self.config = config

    def check_model(self, model: torch.nn.Module) -> None:
        check_peft_fits(model, self.config.peft_config(task_type_of(model)))

    def prepare(self, model: torch.nn.Module, ctx: ModelContext) -> torch.nn.Module:
        return get_peft_model(model, self.config.peft_config(ctx.peft_task_type))

    def trainable_parameters(self, model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
        return requires_grad_parameters(model)

    def on_step_end(self, model: torch.nn.Module, step: int) -> None:
        pass

    def report(self, model: torch.nn.Module) -> dict:
        return {}

    def export(self, model: torch.nn.Module, out_dir: Path) -> list[Export]:
        # Prompt-learning methods (prompt/prefix tuning) have nothing to merge into the weights.
        mergeable = isinstance(model.base_model, BaseTuner) and hasattr(model.base_model, "merge_and_unload")
        return export_peft(model, out_dir, mergeable=mergeable)
