"""Optimizers by name and the learning-rate schedule.

torch's optimizers and bitsandbytes' 8-bit / paged ones are chosen by the same kind of name. bitsandbytes is
imported only when one of its optimizers is asked for (its import is slow and chatty on CPU).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported where an optimizer is built: the CLI's first import stays light
    import torch


def _torch(name: str) -> Callable[..., torch.optim.Optimizer]:
    def make(params: Iterable, **kw: Any) -> torch.optim.Optimizer:
        import torch

        return getattr(torch.optim, name)(params, **kw)

    return make


def _bnb(name: str, **fixed: Any) -> Callable[..., torch.optim.Optimizer]:
    def make(params: Iterable, **kw: Any) -> torch.optim.Optimizer:
        import bitsandbytes.optim as bnb_optim

        # bitsandbytes keeps 32-bit state for tensors under min_8bit_size (default 4096 elements), which would
        # leave most LoRA matrices with 32-bit state; ftbench asks for 8-bit state everywhere unless told not to.
        if "8bit" in name:
            kw.setdefault("min_8bit_size", 1)
        return getattr(bnb_optim, name)(params, **{**fixed, **kw})

    return make


# name -> (factory, library). Paging on CPU silently falls back to ordinary buffers: see `paging_effective`.
OPTIMIZERS: dict[str, tuple[Callable[..., torch.optim.Optimizer], str]] = {
    "adamw": (_torch("AdamW"), "torch"),
    "adam": (_torch("Adam"), "torch"),
    "sgd": (_torch("SGD"), "torch"),
    "adagrad": (_torch("Adagrad"), "torch"),
    "rmsprop": (_torch("RMSprop"), "torch"),
    "adamw_8bit": (_bnb("AdamW8bit"), "bitsandbytes"),
    "adam_8bit": (_bnb("Adam8bit"), "bitsandbytes"),
    "paged_adamw_32bit": (_bnb("PagedAdamW32bit"), "bitsandbytes"),
    "paged_adamw_8bit": (_bnb("PagedAdamW8bit"), "bitsandbytes"),
    "lion_8bit": (_bnb("Lion8bit"), "bitsandbytes"),
}


# torch's Adam and AdamW run fused (one kernel over all tensors) unless the suite's optimizer_args choose an
# implementation (`fused` or `foreach`). torch's default on a CPU is a loop over the tensors, five times slower
# on MiniLM's 22M parameters (62 against 12.5 ms a step on a Xeon, docs/speed.md) and holding two scratch
# tensors the size of the largest one: the same update, in less time and memory. Other optimizers keep torch's
# default. The record names what ran (`optimizer_implementation`).
FUSED_BY_DEFAULT = ("adamw", "adam")


def runs_fused(name: str, extra: dict[str, Any]) -> bool:
    """Whether ``train.optimizer`` with these ``optimizer_args`` runs torch's fused update (given parameters it
    takes): the one rule that building the optimizer and the memory estimate share."""
    if "fused" in extra:
        return bool(extra["fused"])
    return name in FUSED_BY_DEFAULT and "foreach" not in extra


def build_optimizer(
    name: str, params: list[torch.nn.Parameter], lr: float, weight_decay: float, extra: dict[str, Any]
) -> torch.optim.Optimizer:
    """The suite's ``train.optimizer`` (torch or bitsandbytes) over ``groups``, with its arguments checked."""
    factory, _ = OPTIMIZERS[name]
    if "fused" not in extra and runs_fused(name, extra) and _fusable(params):
        extra = {**extra, "fused": True}
    return factory(params, lr=lr, weight_decay=weight_decay, **extra)


def _fusable(params: Iterable) -> bool:
    """torch's fused Adam takes floating-point tensors on a CPU or a CUDA device."""
    tensors = [p for g in params for p in (g["params"] if isinstance(g, dict) else [g])]
    return all(t.is_floating_point() and t.device.type in ("cpu", "cuda") for t in tensors)


def implementation(opt: torch.optim.Optimizer) -> str:
    """How the optimizer ran its update: torch's ``fused`` kernel, ``foreach`` (batched over tensors) or a
    ``for-loop`` over tensors (torch's default on a CPU), or the library that supplied it."""
    module = type(opt).__module__
    if not module.startswith("torch."):
        return module.split(".")[0]
    if opt.defaults.get("fused"):
        return "fused"
    foreach = opt.defaults.get("foreach")
    if foreach is None:  # torch's own choice: foreach where every tensor is on CUDA
        foreach = all(p.device.type == "cuda" for g in opt.param_groups for p in g["params"])
    return "foreach" if foreach else "for-loop"


def lr_lambda(schedule: str, warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """Multiplier of the peak LR at a step: linear warmup, then linear decay to 0, cosine to 0, or constant."""

    def f(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        progress = min(max(progress, 0.0), 1.0)
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0 - progress

    return f


def optimizer_state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes held by the optimizer's state tensors (moments, quantization statistics)."""
    import torch

    seen: set[int] = set()
    total = 0
    for state in opt.state.values():
        for v in state.values():
            if torch.is_tensor(v) and v.untyped_storage().data_ptr() not in seen:
                seen.add(v.untyped_storage().data_ptr())
                total += v.untyped_storage().nbytes()
    return total


def paged_state_in_use(opt: torch.optim.Optimizer) -> bool:
    """True only if some optimizer state really lives in paged (CUDA unified) memory. bitsandbytes falls back
    to ordinary buffers on CPU (it only warns), so a paged optimizer on CPU reports False."""
    import torch

    for state in opt.state.values():
        for v in state.values():
            if torch.is_tensor(v) and getattr(v, "is_paged", False) and v.device.type == "cuda":
                return True
    return False
