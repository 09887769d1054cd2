"""A run's memory estimate for exactly its config, and the plan ``ftbench run --dry-run`` prints.

:func:`estimate_run` maps a cell (:class:`harness.schema.RunConfig`) onto the analytic estimate of
:mod:`harness.measure.estimate`: the architecture from the model's own config (a meta skeleton or the loaded
model), weights in the harness's float32 (methods quantize from there), activations in the training dtype, the
method's rank and targets from its config, the batch at ``max_seq_len`` (an upper bound for a real task, whose
batches pad to their longest row; exact for the synthetic task). Every record carries it beside the measured
peak, by category, so the estimator is checked at every run.
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict
from typing import Any

from harness.cell.optim import runs_fused
from harness.measure.estimate import Arch, Setup, arch_from_model, estimate

WEIGHT_BYTES = 4  # the harness loads every model in float32; autocast computes in the training dtype
# What a process holds besides tensors when an address-space limit (RLIMIT_AS) applies: torch, transformers
# and peft's code and mappings (a cell cannot start under 1200 MiB; harness/schema.py).
PROCESS_OVERHEAD_BYTES = 1.5 * 2**30
ASSUMED_MFU = {"cpu": 0.3, "cuda": 0.4}  # for the dry run's time only; records measure their own


def method_memory_model(cfg):
    """The cell's method's memory model, built from its whole config (None: the method states none)."""
    from harness.registry import get_method

    cls = get_method(cfg.method)
    return cls(cls.Config.model_validate(cfg.method_config)).memory_model()


ATTENTION_DROPOUT = ("attention_probs_dropout_prob", "attention_dropout", "attn_pdrop")  # BERT, Llama, GPT-2


def attention_of(config, device_type: str) -> tuple[str, bool]:
    """How the model's attention keeps its scores in training: (``Setup.attention``, dropout on them). torch's SDPA
    on a CPU takes its math path where the probabilities get dropout (its flash kernel has none), keeping the
    scores as eager attention does: MiniLM-L6 (dropout 0.1) at 384 tokens held 1.3 GiB of activations where the
    estimate without them said 0.35."""
    dropout = next((float(v) for k in ATTENTION_DROPOUT if isinstance(v := getattr(config, k, None), int | float)), 0.0)
    if getattr(config, "_attn_implementation", "sdpa") == "eager":
        return "eager", dropout > 0
    return ("math" if device_type == "cpu" and dropout > 0 else "sdpa"), dropout > 0


def setup_for(cfg, model, device_type: str = "cpu") -> Setup:
    """The estimate's setup for a cell on ``model`` (its skeleton or itself), training on ``device_type``."""
    mc, t = cfg.method_config, cfg.train
    attention, dropout = attention_of(model.config, device_type)
    mm = method_memory_model(cfg)  # the method's own memory model, from its whole config (targets included)
    setup = Setup(
        method=cfg.method,
        r=mm.rank if mm is not None and mm.rank else int(mc.get("r", 16)),  # the method's own default rank
        batch=t.batch_size,
        seq_len=t.max_seq_len,
        grad_checkpointing=t.grad_checkpointing,
        weight_dtype_bytes=WEIGHT_BYTES,
        activation_bytes=2 if t.dtype in ("bfloat16", "float16") else 4,
        optimizer=t.optimizer,
        optimizer_fused=runs_fused(t.optimizer, t.optimizer_args),
        double_quant=bool(mc.get("double_quant", True)),
        bits=int(mc.get("bits", 4)),
        group_size=int(mc.get("group_size", 32)),
        attention=attention,
        attention_dropout=dropout,
    )
    targets = mm.targets if mm is not None else None  # no memory model: estimate_run says "not estimated"
    if targets == "peft-default":  # peft's per-architecture default (Llama, Qwen2, Mistral: q_proj and v_proj)
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS

        targets = tuple(DEFAULTS.get(model.config.model_type, ()) or ()) or None
    if targets is not None:
        targets = block_roles(model, arch_from_model(model), targets)
    return Setup(**{**asdict(setup), "targets": targets})


def block_roles(model, arch: Arch, targets: tuple[str, ...]) -> tuple[str, ...]:
    """The estimate's names (``q_proj`` … ``down_proj``) of the block linears that ``targets`` select, matched as
    peft matches them (a module's name, or the end of its dotted name after a dot, or a regular expression over
    the whole name). The estimate counts Llama-named blocks; an encoder's block (BERT: query, key, value,
    attention.output.dense, intermediate.dense, output.dense) has the same matrices in the same order. Where the
    first block's linears do not line up with the estimate's, shape by shape, the names are returned as given."""
    import torch

    stacks = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.ModuleList) and len(m) > 0]
    stack = next(((n, m) for n, m in stacks if len(m) == arch.layers), None)
    if stack is None:
        return targets
    prefix, block = stack
    linears = [(f"{prefix}.0.{n}", m) for n, m in block[0].named_modules() if isinstance(m, torch.nn.Linear)]
    roles = arch.linear_shapes()
    if [(m.in_features, m.out_features) for _, m in linears] != [(i, o) for _, i, o in roles]:
        return targets

    def selected(name: str) -> bool:
        return any(name == t or name.endswith("." + t) or re.fullmatch(t, name) for t in targets)

    return tuple(role for (name, _), (role, _, _) in zip(linears, roles, strict=True) if selected(name))


def estimate_run(
    cfg, model, decoder: bool, optimizer_fused: bool | None = None, device_type: str = "cpu"
) -> dict[str, Any]:
    """``ftbench estimate``'s prediction for this cell on ``device_type``: bytes by category, the peak, and the
    setup it assumed; or why it cannot say (a method without a memory model, an architecture it does not read).
    ``optimizer_fused`` overrides what the config implies (a record made before torch's Adam ran fused)."""
    from harness.measure.estimate import NotEstimated

    try:
        mm = method_memory_model(cfg)
        if mm is None:
            raise NotEstimated(f"{cfg.method}: not estimated (the method states no memory model)")
        setup = setup_for(cfg, model, device_type)
        if optimizer_fused is not None:
            setup = Setup(**{**asdict(setup), "optimizer_fused": optimizer_fused})
        e = estimate(arch_from_model(model, lm_head=decoder), setup, mm)
    except (NotEstimated, AttributeError, ValueError) as err:
        return {"not_estimated": str(err).splitlines()[0]}
    return {
        "peak_bytes": e["peak"],
        "by_category_bytes": {
            k: e[k] for k in ("weights", "gradients", "optimizer_state", "optimizer_state_host", "activations")
        },
        "trainable_params": e["trainable_params"],
        "setup": {k: v for k, v in asdict(setup).items() if k != "method"},
        "assumes": f"weights {WEIGHT_BYTES} bytes, activations {setup.activation_bytes} bytes, batch × max_seq_len",
    }


def measured_by_category(r) -> dict[str, int] | None:
    """A record's tracked bytes at its peak, in the estimate's categories (weights: parameters, packed ones and
    buffers;
    activations: activations, inputs and temporaries)."""
    m = r.training.memory_at_peak_bytes
    if not m:
        return None
    return {
        "weights": sum(m.get(k, 0) for k in ("params_trainable", "params_frozen", "params_quantized", "buffers")),
        "gradients": m.get("gradients", 0),
        "optimizer_state": m.get("optimizer_state", 0),
        "activations": m.get("activations", 0) + m.get("inputs", 0) + m.get("temporaries", 0),
    }


def machine_memory_bytes(device_type: str) -> tuple[int, str]:
    """What a cell may use here: the GPU's memory, or the machine's RAM (Linux /proc/meminfo)."""
    if device_type == "cuda":
        import torch

        return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory, "GPU memory"
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "RAM"
