"""Measurements behind two of QLoRA's claims (Dettmers et al., 2023), taken on a real model's weights.

* **NF4 vs FP4 vs INT4 at equal bits (§3, "4-bit NormalFloat").** Each linear weight is quantized block-wise
  (64 consecutive values, one fp32 absmax each: 4 + 0.5 bits per value for all three) with bitsandbytes' NF4
  and FP4, and with symmetric round-to-nearest INT4 (scale = absmax / 7, q ∈ [−8, 7]); the error is the relative
  squared error ‖W − Ŵ‖² / ‖W‖² per layer. NF4's levels are the quantiles of a normal distribution, so for
  normally distributed weights each level is used equally often (information-theoretically optimal).
* **Double quantization (§3).** The absmax constants quantized again (8-bit, blocks of 256, one fp32 constant
  each): from 32/64 = 0.5 to 8/64 + 32/(64·256) ≈ 0.127 bits per parameter, a saving of ≈ 0.373. Measured
  here from the bytes of bitsandbytes' own quantization state, not from the formula.

A model whose weights were themselves stored 4-bit (SmolLM2 from a GGUF Q4_1 file: 16 levels per group of
32, asymmetric) is a biased test of any 4-bit format; the result says so.
"""

from __future__ import annotations

import torch

BLOCK = 64


def int4_absmax(w: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    """Symmetric INT4 round-to-nearest per block of ``block`` values (one absmax each), dequantized."""
    flat = w.float().reshape(-1, block)
    scale = flat.abs().amax(-1, keepdim=True).clamp_min(1e-12) / 7
    return ((flat / scale).round().clamp(-8, 7) * scale).reshape(w.shape)


def bnb_roundtrip(w: torch.Tensor, quant_type: str, double_quant: bool = False, block: int = BLOCK):
    """bitsandbytes' 4-bit quantize → dequantize; returns (Ŵ, quant_state)."""
    import bitsandbytes.functional as F

    packed, state = F.quantize_4bit(
        w.float().contiguous(), blocksize=block, compress_statistics=double_quant, quant_type=quant_type
    )
    return F.dequantize_4bit(packed, state).reshape(w.shape).float(), state


def relative_error(w: torch.Tensor, q: torch.Tensor) -> float:
    """‖q − w‖ / ‖w‖: the quantized weight's relative error."""
    w = w.float()
    return float(((w - q) ** 2).sum() / (w**2).sum())


def linear_weights(model: torch.nn.Module, skip: tuple[str, ...] = ()) -> list[tuple[str, torch.Tensor]]:
    """Every nn.Linear weight whose size the block divides (heads in ``skip`` left out)."""
    return [
        (n, m.weight.detach())
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and m.weight.numel() % BLOCK == 0 and not any(s in n for s in skip)
    ]


def per_layer_errors(model: torch.nn.Module, skip: tuple[str, ...] = ()) -> list[dict]:
    """Per linear layer: the relative squared error of NF4, FP4 and INT4 (absmax), all at 4 + 0.5 bits."""
    rows = []
    for name, w in linear_weights(model, skip):
        rows.append(
            {
                "layer": name,
                "params": w.numel(),
                "nf4": relative_error(w, bnb_roundtrip(w, "nf4")[0]),
                "fp4": relative_error(w, bnb_roundtrip(w, "fp4")[0]),
                "int4": relative_error(w, int4_absmax(w)),
            }
        )
    return rows


def _state_bytes(state) -> int:
    """Bytes of a bitsandbytes QuantState's constants: absmax, and with double quantization the second level's
    absmax, its code book and offset."""
    total = state.absmax.numel() * state.absmax.element_size()
    nested = getattr(state, "state2", None)
    if nested is not None:
        total += nested.absmax.numel() * nested.absmax.element_size()
        total += nested.code.numel() * nested.code.element_size()
        if getattr(state, "offset", None) is not None:
            total += state.offset.numel() * state.offset.element_size()
    return total


def constant_bits(weights: list[torch.Tensor], double_quant: bool) -> float:
    """Bits per parameter spent on quantization constants over ``weights``, as bitsandbytes stores them."""
    n = sum(w.numel() for w in weights)
    return 8 * sum(_state_bytes(bnb_roundtrip(w, "nf4", double_quant)[1]) for w in weights) / n


MODELS = (("minilm-l6", None, ("classifier",)), ("smollm2-135m", "prompt", ("lm_head",)))  # name, mode, heads


def measure(models=MODELS, big: int = 4096) -> dict:
    """Everything the QLoRA measurement claims read (``ftbench claims`` caches it in the results dir):
    per-layer errors on each model (MiniLM-L6: real fp32 weights; SmolLM2: Q4_1-derived), and the constants'
    bits with and without double quantization on a ``big``² normal matrix (4096: a LLaMA-7B projection's
    shape) and on the first model's linears."""
    from harness.cell.models import load_model

    out: dict = {"block": BLOCK, "layers": {}}
    first = None
    for name, mode, skip in models:
        model = load_model(name, 2, 0, **({"mode": mode} if mode else {})).model
        out["layers"][name] = per_layer_errors(model, skip)
        if first is None:
            first = (name, [w for _, w in linear_weights(model, skip)])
    normal = [torch.randn(big, big, generator=torch.Generator().manual_seed(0)) * 0.02]
    sets = [(f"normal {big}x{big}", normal)] + ([(f"{first[0]} linears", first[1])] if first else [])
    out["constant_bits"] = {
        name: {"plain": constant_bits(ws, False), "double_quant": constant_bits(ws, True)} for name, ws in sets
    }
    return out
