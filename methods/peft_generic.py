"""Any PEFT method by ``peft_type`` plus that config's own fields (IA3, prompt tuning, prefix tuning, LoHa,
LoKr, VeRA, BOFT, AdaLoRA, ...): most PEFT methods need no ftbench code at all.

AdaLoRA (Zhang et al. 2023, arXiv 2303.10512) reallocates its rank budget during training: after each optimizer
step (gradients still present) its tuner's ``update_and_allocate`` runs, from the ``on_step_end`` hook, and
``total_step`` defaults to the run's steps. The record's ``method_metrics`` give the active rank (non-zero
singular values) before, after and at each change.

Example suite entry::

    - method: peft
      variant: ia3
      config: {peft_type: IA3, target_modules: [key, value, output.dense], feedforward_modules: [output.dense]}
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import Field, field_validator, model_validator

from harness.contract import Export, MethodBase, ModelContext, register_method
from methods.common import (
    PEFT_RESERVED,
    PeftOptions,
    adapter_on_base,
    check_peft_fits,
    export_peft,
    requires_grad_parameters,
    with_heads,
)

if TYPE_CHECKING:
    import torch


def positions_from_mask(base: torch.nn.Module) -> None:
    """Prompt tuning and P-tuning put their virtual tokens before the input and drop ``position_ids`` (peft's
    ``_adjust_prompt_learning_kwargs``), so the base model numbers positions 0, 1, … over the whole row: before a
    left-padded row its virtual tokens sat as many positions away as the row had padding, and a row's scores
    depended on its batch (2 of 24 SmolLM2 predictions differed from batch 1, 2026-12-07). A pre-hook numbers the
    positions from the attention mask, as transformers' generate does: virtual tokens 0..P-1, then the row's own
    tokens, padding or not, in training, evaluation and generation alike (the last ``n`` where a cache holds the
    rest). A base whose forward takes no ``position_ids`` is left as it is."""
    import inspect

    if "position_ids" not in inspect.signature(base.forward).parameters:
        return

    def number(module, args, kwargs):
        mask, x = kwargs.get("attention_mask"), kwargs.get("inputs_embeds")
        x = x if x is not None else kwargs.get("input_ids")
        if kwargs.get("position_ids") is None and mask is not None and mask.dim() == 2 and x is not None:
            kwargs["position_ids"] = (mask.long().cumsum(-1) - 1).clamp(min=0)[:, -x.shape[1] :]
        return args, kwargs

    base.register_forward_pre_hook(number, with_kwargs=True)


def through_layers(cfg) -> bool:
    """Prompt learning whose virtual token embeddings join the input and go through every layer (prompt tuning,
    P-tuning, …); prefix tuning's go into the attention's keys and values only (peft's PeftModel.forward)."""
    return getattr(cfg, "is_prompt_learning", False) and cfg.peft_type != "PREFIX_TUNING"


def as_trained(model: torch.nn.Module) -> torch.nn.Module:
    """A PEFT model as ftbench trains, scores and serves it: for prompt learning, positions from the mask
    (:func:`positions_from_mask`, where the virtual tokens go through the layers) and no generation cache."""
    cfg = model.peft_config[model.active_adapter]
    if not getattr(cfg, "is_prompt_learning", False):
        return model
    if through_layers(cfg):
        positions_from_mask(model.get_base_model())
    if hasattr(model.get_base_model(), "generation_config"):
        # peft 0.21 looks for the KV cache under `past_key_values`, transformers 5 passes it as `cache`: in
        # generate(), prompt tuning re-injects its virtual tokens at every cached step (the cache grew 12, 17,
        # 22) and prefix tuning's prefix is never read (its answers were the base model's). So generate() keeps
        # no cache, and ftbench decodes on the cache this model's forward fills (harness/tasks/decoding.py)
        model.get_base_model().generation_config.use_cache = False
    return model


@functools.cache
def peft_types() -> list[str]:
    """Every PEFT type this peft knows (peft is imported here, when a config needs it, not with the file)."""
    from peft import PEFT_TYPE_TO_CONFIG_MAPPING

    return sorted(str(k.value if hasattr(k, "value") else k) for k in PEFT_TYPE_TO_CONFIG_MAPPING)


def _active_rank(model: torch.nn.Module) -> int | None:
    """AdaLoRA's rank budget in use: the singular values its allocator keeps (``rank_pattern``, once it has
    allocated; ``init_r`` per layer before), over all layers; None for other methods."""
    config = model.peft_config[model.active_adapter]
    layers = [n for n, _ in model.named_parameters() if "lora_E" in n]
    if not layers or not hasattr(config, "init_r"):
        return None
    if not config.rank_pattern:
        return config.init_r * len(layers)
    return int(sum(sum(bool(b) for b in mask) for mask in config.rank_pattern.values()))


def _config_class(peft_type: str):
    from peft import PEFT_TYPE_TO_CONFIG_MAPPING

    return next(v for k, v in PEFT_TYPE_TO_CONFIG_MAPPING.items() if str(getattr(k, "value", k)) == peft_type)


@register_method
class PeftGeneric(MethodBase):
    """Any PEFT method by peft_type plus that config's own fields."""

    name = "peft"

    class Config(PeftOptions):
        peft_type: str = Field(
            description="a PEFT type (LORA, LOHA, LOKR, IA3, VERA, BOFT, PROMPT_TUNING, …: every type the installed "
            "peft knows); other keys are that config's fields"
        )

        @field_validator("peft_type")
        @classmethod
        def _known(cls, v: str) -> str:
            if v.upper() not in peft_types():
                raise ValueError(f"unknown peft_type {v!r}; allowed: {', '.join(peft_types())}")
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

        def peft_config(self, task_type: str = "SEQ_CLS", total_step: int | None = None):
            """``total_step`` (AdaLoRA's schedule): the run's steps where the suite gives none (a placeholder when
            the config is only validated, before the steps are known)."""
            cls = _config_class(self.peft_type)
            extra = dict(self.model_extra or {})
            if "total_step" in {f.name for f in dataclasses.fields(cls)} and extra.get("total_step") is None:
                extra["total_step"] = total_step or 10**6
            return cls(task_type=task_type, **extra)

    def check_model(self, model: torch.nn.Module, ctx: ModelContext) -> None:
        _no_cuda_build_without_cuda()
        check_peft_fits(model, self.config.peft_config(ctx.peft_task_type))

    def prepare(self, model: torch.nn.Module, ctx: ModelContext) -> torch.nn.Module:
        from peft import get_peft_model

        _no_cuda_build_without_cuda()

        model = get_peft_model(
            model, with_heads(self.config.peft_config(ctx.peft_task_type, ctx.train_steps or None), ctx)
        )
        self._load_base = ctx.load_base  # the adapter's deployable form: unmerged, or prompt learning's only one
        self._ranks = [(0, _active_rank(model))]
        cfg = model.peft_config[model.active_adapter]
        self._positions_added = int(cfg.num_virtual_tokens) if through_layers(cfg) else 0
        self._trains_inputs = getattr(cfg, "is_prompt_learning", False)  # its prompt_encoder is registered last
        return as_trained(model)

    def positions_added(self) -> int:
        return getattr(self, "_positions_added", 0)

    def trains_inputs(self) -> bool:
        return getattr(self, "_trains_inputs", False)

    def on_step_end(self, model: torch.nn.Module, step: int) -> None:
        tuner = model.base_model
        if hasattr(tuner, "update_and_allocate"):  # AdaLoRA: importance scores from this step's gradients
            tuner.update_and_allocate(step)
            rank = _active_rank(model)
            if rank != self._ranks[-1][1]:
                self._ranks.append((step + 1, rank))

    def report(self, model: torch.nn.Module) -> dict:
        if not getattr(self, "_ranks", None) or self._ranks[0][1] is None:
            return {}
        return {
            "active_rank_initial": self._ranks[0][1],
            "active_rank_final": self._ranks[-1][1],
            "active_rank_changes": [{"after_step": s, "active_rank": r} for s, r in self._ranks],
        }

    def trainable_parameters(self, model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
        return requires_grad_parameters(model)

    def export(self, model: torch.nn.Module, out_dir: Path) -> list[Export]:
        from peft.tuners.tuners_utils import BaseTuner

        # Prompt-learning methods (prompt/prefix tuning) have nothing to merge into the weights.
        mergeable = isinstance(model.base_model, BaseTuner) and hasattr(model.base_model, "merge_and_unload")
        load_base = getattr(self, "_load_base", None)
        out = export_peft(model, out_dir, mergeable=mergeable, load_base=load_base)
        cfg = model.peft_config[model.active_adapter]
        if getattr(cfg, "is_prompt_learning", False):  # served as trained: its virtual tokens in every call
            note = f"{cfg.num_virtual_tokens} virtual tokens in every call: nothing to merge"
            out[0].deploy = [adapter_on_base("adapter on the base", out[0].path, load_base, note, then=as_trained)]
        return out


def _no_cuda_build_without_cuda() -> None:
    """peft's BOFT layers try to compile a CUDA extension (ninja, gcc) the first time one is built, whatever the
    device: two warnings, ``CC``/``CXX`` changed meanwhile, and up to seconds once per empty
    ``~/.cache/torch_extensions`` (~9 s seen on one machine, 0.04 s on another), for a build that cannot
    succeed. Where torch has no CUDA, peft is told at once that the extension is missing, which is what the
    failed build told it: BOFT then uses its plain PyTorch block-diagonal product and sets its butterfly factor
    to 1 (peft/tuners/boft/layer.py)."""
    import torch

    if torch.cuda.is_available():
        return
    from peft.tuners.boft import layer

    layer.get_fbd_cuda = lambda: None
