"""Adapter initialisations for a quantized base, made on the float weights before quantization (no registered
class here; methods/qlora.py uses it through its ``init_lora_weights`` field).

* **QPiSSA** (Meng et al. 2024, PiSSA, arXiv 2404.02948, §4 "QPiSSA"): the adapter takes W's r principal
  singular components, B A = U_r S_r V_rᵀ / s, and the base keeps the residual W − s·B A, which is what gets
  quantized. The residual has smaller outliers than W, so NF4 loses less of it.
* **LoftQ** (Li et al. 2023, arXiv 2310.08659, Algorithm 1): alternate Q_t = q(W − s·B_{t−1} A_{t−1}) and
  s·B_t A_t = SVD_r(W − Q_t), so that Q + s·B A approximates W rather than Q alone.

QPiSSA is PEFT's own (``init_lora_weights="pissa"``), run on the float model as PEFT documents it: on a
bitsandbytes 4-bit base PEFT refuses it ("TypeError: Please initialize PiSSA under float32, float16, or
bfloat16. Subsequently, re-quantize the residual model", peft/tuners/lora/layer.py). PEFT's LoftQ cannot run on
a CPU: ``loftq_init`` moves every weight to ``"cuda"`` (peft/utils/loftq_utils.py, ``compute_device = "xpu" if
is_xpu_available() else "cuda"``: "AssertionError: Torch not compiled with CUDA enabled"), and it quantizes with
bitsandbytes' defaults rather than the base's own blocksize and double quantization. So :func:`loftq` is
Algorithm 1 written here, with the exact quantizer the base will get (``quantize``): the base left behind is
the input of the last quantization, and quantizing it again gives the same Q.
"""

from __future__ import annotations

from typing import Any

from harness.lazy import lazy_module

torch = lazy_module("torch")


def init_on_float(model, lora_config: Any) -> tuple[Any, dict[str, tuple[Any, Any]], dict[str, Any]]:
    """(the model with PEFT's base weights and no adapters, {layer path: (A, B)}, {layer path: original W})."""
    from peft import get_peft_model
    from peft.tuners.lora import LoraLayer

    originals = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    peft_model = get_peft_model(model, lora_config)
    adapters, kept = {}, {}
    for name, mod in peft_model.base_model.model.named_modules():
        if isinstance(mod, LoraLayer):
            adapters[name] = (
                mod.lora_A["default"].weight.detach().clone(),
                mod.lora_B["default"].weight.detach().clone(),
            )
            kept[name] = originals[name]
    del originals
    return peft_model.unload(), adapters, kept


def put_adapters(peft_model, adapters: dict[str, tuple[Any, Any]], originals: dict[str, Any]) -> float:
    """Copy the adapters into ``peft_model``'s LoRA layers; returns ||deq(Q) + s·B A − W||_F / ||W||_F over them
    (the initialisation's error against the original weights: what LoftQ and QPiSSA minimise)."""
    import bitsandbytes.functional as F
    from peft.tuners.lora import LoraLayer

    err = ref = 0.0
    found = 0
    for name, mod in peft_model.base_model.model.named_modules():
        if not isinstance(mod, LoraLayer) or name not in adapters:
            continue
        a, b = adapters[name]
        mod.lora_A["default"].weight.data.copy_(a)
        mod.lora_B["default"].weight.data.copy_(b)
        base = mod.get_base_layer()
        w = F.dequantize_4bit(base.weight.data, base.weight.quant_state).float()
        approx = w + mod.scaling["default"] * (b.float() @ a.float())
        err += float((approx - originals[name].float()).pow(2).sum())
        ref += float(originals[name].float().pow(2).sum())
        found += 1
    if found != len(adapters):
        raise ValueError(f"qlora: {len(adapters) - found} initialised adapters found no layer after quantization")
    return (err / ref) ** 0.5


def loftq(model, lora_config: Any, quantize, iters: int) -> tuple[Any, dict[str, tuple[Any, Any]], dict[str, Any]]:
    """LoftQ (Li et al. 2023, Algorithm 1) on the layers ``lora_config`` targets; ``quantize(W)`` is the base's
    quantizer, returning the dequantized weight. Returns what :func:`init_on_float` does."""
    import math

    config = type(lora_config)(**{**lora_config.to_dict(), "init_lora_weights": True})  # the targets only
    model, adapters, originals = init_on_float(model, config)
    r = lora_config.r
    s = lora_config.lora_alpha / (math.sqrt(r) if lora_config.use_rslora else r)
    for name, (a0, b0) in adapters.items():
        w = originals[name].float()
        a, b = torch.zeros_like(a0, dtype=torch.float32), torch.zeros_like(b0, dtype=torch.float32)
        for _ in range(iters):
            base = w - s * (b @ a)  # what is quantized: the part the adapter does not carry
            u, sv, vh = torch.linalg.svd(w - quantize(base), full_matrices=False)
            root = sv[:r].sqrt() / math.sqrt(s)
            b, a = u[:, :r] * root, root[:, None] * vh[:r]  # s·B A = the error's best rank-r approximation
        model.get_submodule(name).weight.data.copy_(base.to(model.get_submodule(name).weight.dtype))
        adapters[name] = (a.to(a0.dtype), b.to(b0.dtype))
    return model, adapters, originals
