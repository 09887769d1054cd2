"""Micro-benchmarks: forward + backward of one linear layer, plain and under each method's layer type.

Run with `make bench` (never by `make test`). Results are saved as pytest-benchmark JSON under .benchmarks/,
so two versions can be compared: `pytest bench/test_layers.py --benchmark-compare`.
Widths 768 and 2048, batch of 8 × 128 tokens; the base weight is frozen for every adapter method (as in
training), so its backward computes only the input gradient. Where this machine emulates bf16 (AVX2-only CPUs:
one 2048-wide bf16 step takes ~30 s), the bf16 cases run 2 rounds instead of 10 and say why in extra_info.
"""

from __future__ import annotations

import pytest
import torch

TOKENS = 8 * 128
WIDTHS = [768, 2048]


def _lora(base: torch.nn.Module, d: int, r: int = 16) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    holder = torch.nn.Sequential(base)
    holder.is_loaded_in_4bit = type(base).__name__ == "Linear4bit"  # peft's 4-bit-aware LoRA layer
    return get_peft_model(holder, LoraConfig(r=r, lora_alpha=32, target_modules=["0"]))


def _layer(kind: str, d: int) -> tuple[torch.nn.Module, torch.dtype]:
    torch.manual_seed(0)
    lin = torch.nn.Linear(d, d)
    if kind == "fp32":
        return lin, torch.float32
    if kind == "bf16":
        return lin.to(torch.bfloat16), torch.bfloat16
    lin.requires_grad_(False)
    if kind == "lora":
        return _lora(lin, d), torch.float32
    if kind.startswith("qlora"):
        from methods.qlora import QLoraOptions, quantize_linears

        holder = torch.nn.Sequential(lin)
        compute = "bfloat16" if kind.endswith("bf16") else "float32"
        quantize_linears(holder, set(), QLoraOptions(compute_dtype=compute))
        return _lora(holder[0], d), torch.float32
    if kind == "qalora_int4":
        from methods.intquant import QuantLinear
        from methods.qalora_layer import QALoraLinear

        q = QuantLinear.from_linear(lin, 4, 32, torch.float16, torch.float32)
        return QALoraLinear(q, r=16, alpha=32, dropout=0.0), torch.float32
    raise ValueError(kind)


@pytest.mark.parametrize("d", WIDTHS)
@pytest.mark.parametrize("kind", ["fp32", "bf16", "lora", "qlora_nf4_fp32", "qlora_nf4_bf16", "qalora_int4"])
def test_linear_forward_backward(benchmark, kind, d):
    layer, dtype = _layer(kind, d)
    x = torch.randn(TOKENS, d, dtype=dtype, requires_grad=True)

    def step():
        layer(x).float().sum().backward()

    from harness.environment import describe
    from harness.measure.hardware import identity, slow_note

    slow = slow_note("bfloat16") if "bf16" in kind else None
    benchmark.group = f"linear {d}"
    benchmark.extra_info.update(kind=kind, width=d, tokens=TOKENS, hardware=describe(identity()), slow=slow)
    rounds, warmup = (2, 1) if slow else (10, 2)
    benchmark.pedantic(step, rounds=rounds, warmup_rounds=warmup, iterations=1)
