"""Merge-aware LoRA: the adapter trains through the fake-quantized *merged* weight, so the INT-N model it
exports is exactly the model it trained.

    h = Q(W + s·B A) x + b,      s = alpha / r,

where Q is group-wise min-max round-to-nearest INT-N (:func:`methods.intquant.quantize_rtn`, the format
QA-LoRA and QLoRA's INT-N exports use: ``bits`` per weight, an fp16 scale and zero per group of ``group_size``
input channels). Q has no useful gradient, so backward treats it as the identity (the straight-through
estimator, Bengio et al. 2013): ∂L/∂(B A) = s · ∂L/∂W_q, which gives LoRA's own gradients,
∂L/∂B = s · gᵀ (x Aᵀ) and ∂L/∂A = s · (g B)ᵀ x, with no d_out × d_in gradient ever formed.

It is in the spirit of L4Q (Jeon et al., ACL 2025, arXiv 2402.04902: LoRA learned through the quantized merged
weight, with learned quantization steps) and LR-QAT (Bondarenko et al. 2024, arXiv 2406.06385: low-rank
quantization-aware training); here the quantizer is plain RTN with min-max ranges recomputed at every step, so
the export is the same computation as the forward: quantize W + s·B A once more and store the integers.

Unlike QA-LoRA (methods/qalora.py), the base stays in float during training (LoRA's memory, not QLoRA's) and
every step re-quantizes every adapted weight (elementwise, O(d_out · d_in) per layer, in forward and again in
backward, which recomputes it rather than keeping a dense weight per layer). The merged model is INT-N with
integer-valued *and* re-fitted ranges, on any kernel that reads the format.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from harness.contract import Export, MemoryModel, MethodBase, ModelContext, attempt, register_method
from harness.lazy import lazy_module
from harness.schema import Strict
from methods.common import conv1d_note, dir_bytes, requires_grad_parameters
from methods.qalora import linear_targets

torch = lazy_module("torch")  # imported at first use: the config validates without it (harness/lazy.py)
intquant = lazy_module("methods.intquant")


class QatLoraOptions(Strict):
    """Merge-aware LoRA's options: rank, the INT-N format it trains for, targets."""

    r: int = Field(8, gt=0, description="adapter rank")
    alpha: float = Field(16, gt=0, description="updates are scaled by alpha / r")
    bits: Literal[2, 3, 4, 8] = 4
    group_size: Literal[16, 32, 64, 128] = Field(32, description="input channels per quantization group")
    target_modules: list[str] | None = Field(None, description="Linear names to adapt + quantize; None = all but head")
    skip_modules: list[str] = Field(default_factory=list, description="Linear names left in float, not adapted")


def _fake_quant(weight, a, b, scaling: float, bits: int, group: int):
    """Q(W + s·B A) in float32, outside autocast: the integers, the fp16 scales and zeros, and the dequantized
    weight, computed exactly as the export computes them."""
    with torch.autocast(weight.device.type, enabled=False):
        w = weight.float() + scaling * (b.float() @ a.float())
        q, scale, zero = intquant.quantize_rtn(w, bits, group)
        scale, zero = scale.to(torch.float16), zero.to(torch.float16)  # as stored: QuantLinear's param dtype
        return q, scale, zero, intquant.dequantize(q, scale, zero, group, torch.float32)


@functools.cache
def _modules():
    """The torch classes, defined at first use (the config validates without importing torch)."""

    class QatMatmul(torch.autograd.Function):
        """y = x · Q(W + s·B A)ᵀ + b; backward: the straight-through estimator, recomputing Q rather than
        saving a dense weight per layer (so memory stays LoRA's)."""

        @staticmethod
        def forward(ctx, x, layer, a, b):
            ctx.layer = layer
            ctx.save_for_backward(x, a, b)
            ctx.autocast = (x.device.type, torch.is_autocast_enabled(x.device.type),
                            torch.get_autocast_dtype(x.device.type))  # fmt: skip
            w = _fake_quant(layer.weight, a, b, layer.scaling, layer.bits, layer.group_size)[3]
            return torch.nn.functional.linear(x, w, layer.bias)

        @staticmethod
        def backward(ctx, grad):
            x, a, b = ctx.saved_tensors
            layer = ctx.layer
            device, enabled, dtype = ctx.autocast
            with torch.autocast(device, dtype=dtype, enabled=enabled):  # the forward's precision, in backward too
                w = _fake_quant(layer.weight, a, b, layer.scaling, layer.bits, layer.group_size)[3]
                grad_x = grad.to(w.dtype) @ w if ctx.needs_input_grad[0] else None
            g = grad.reshape(-1, grad.shape[-1]).float()
            xf = x.reshape(-1, x.shape[-1]).float()
            grad_b = layer.scaling * (g.T @ (xf @ a.float().T))  # d_out × r
            grad_a = layer.scaling * ((g @ b.float()).T @ xf)  # r × d_in
            return grad_x, None, grad_a.to(a.dtype), grad_b.to(b.dtype)

    class QatLoraLinear(torch.nn.Module):
        """A frozen float Linear whose weight, plus s·B A, is fake-quantized at every forward."""

        def __init__(self, lin, r: int, alpha: float, bits: int, group: int) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(lin.weight.detach().float().clone(), requires_grad=False)
            self.bias = None if lin.bias is None else torch.nn.Parameter(lin.bias.detach().clone(), False)
            self.in_features, self.out_features = lin.in_features, lin.out_features
            self.lora_A = torch.nn.Parameter(torch.empty(r, lin.in_features, device=lin.weight.device))
            self.lora_B = torch.nn.Parameter(
                torch.zeros(lin.out_features, r, device=lin.weight.device)
            )  # zero B: training starts at Q(W)
            torch.nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as LoRA
            self.scaling, self.bits, self.group_size = alpha / r, bits, group

        def forward(self, x):
            return QatMatmul.apply(x, self, self.lora_A, self.lora_B)

        def quantized(self):
            """The INT-N layer this one computes, as the export stores it."""
            q, scale, zero, _ = _fake_quant(self.weight, self.lora_A, self.lora_B, self.scaling, self.bits,
                                            self.group_size)  # fmt: skip
            out = intquant.QuantLinear(self.in_features, self.out_features, self.bits, self.group_size,
                                       self.bias is not None)  # fmt: skip
            out.set_quantized(q, scale, zero)
            if self.bias is not None:
                out.bias.data = self.bias.detach().float().clone()
            return out.to(self.weight.device)

    return QatMatmul, QatLoraLinear


@register_method
class QatLora(MethodBase):
    """Merge-aware LoRA: trained through Q(W + s·B A) (straight-through), exported as exactly that INT-N model."""

    name = "qat_lora"
    Config = QatLoraOptions

    def __init__(self, config: QatLoraOptions) -> None:
        self.config = config
        self._layers: list[str] = []
        self._metrics: dict[str, Any] = {}

    def memory_model(self) -> MemoryModel:
        """LoRA's: a float base, fp32 adapters r·(d_in + d_out) per targeted linear, the inputs saved; the
        adapted weights recomputed in backward, not kept."""
        c = self.config
        targets = tuple(c.target_modules) if c.target_modules else None
        return MemoryModel("adapters", c.r, None, 1, targets, saves_weight_copies=False)

    def check_model(self, model: torch.nn.Module, ctx: ModelContext) -> None:
        c = self.config
        heads = set(ctx.head_names) | set(ctx.output_names)
        targets = linear_targets(model, heads, c.target_modules, c.skip_modules)
        if not targets:
            raise ValueError(f"qat_lora: no Linear layer matches target_modules={c.target_modules}{conv1d_note(model)}")
        for path, lin in targets:
            if lin.in_features % c.group_size:
                raise ValueError(
                    f"qat_lora: group_size {c.group_size} does not divide d_in={lin.in_features} of {path!r}"
                )

    def prepare(self, model: torch.nn.Module, ctx: ModelContext) -> torch.nn.Module:
        c = self.config
        self.check_model(model, ctx)
        targets = linear_targets(model, set(ctx.head_names) | set(ctx.output_names), c.target_modules, c.skip_modules)
        for p in model.parameters():
            p.requires_grad_(False)
        err = ref = 0.0
        for path, lin in targets:
            layer = _modules()[1](lin, c.r, c.alpha, c.bits, c.group_size)
            w = layer.weight
            deq = _fake_quant(w, layer.lora_A, layer.lora_B, layer.scaling, c.bits, c.group_size)[3]
            err += float((deq - w).detach().pow(2).sum())
            ref += float(w.pow(2).sum())
            intquant.set_module(model, path, layer)
        for name in ctx.head_names:  # the classifier head trains in full, as with LoRA
            for p in model.get_submodule(name).parameters():
                p.requires_grad_(True)
        self._layers = [p for p, _ in targets]
        self._metrics = {
            "bits": c.bits,
            "group_size": c.group_size,
            "quantizer": "rtn",
            "quantized_modules": len(targets),
            "quant_relative_error_initial": (err / ref) ** 0.5,  # of Q(W) against W: where training starts
        }
        return model

    def trainable_parameters(self, model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
        return requires_grad_parameters(model)

    def export(self, model: torch.nn.Module, out_dir: Path) -> list[Export]:
        return [attempt("merged_int", out_dir / "merged_int", lambda: self._export_int(model, out_dir / "merged_int"))]

    def _export_int(self, model: torch.nn.Module, path: Path) -> Export:
        import copy

        c = self.config
        merged = copy.deepcopy(model)
        for p in self._layers:
            intquant.set_module(merged, p, merged.get_submodule(p).quantized())
        intquant.save_int_model(merged, self._layers, path, c.bits, c.group_size, "float16", "float32")
        reloaded = intquant.load_merged(path).to(next(model.parameters()).device)
        return Export(
            "merged_int",
            path,
            dir_bytes(path),
            model=reloaded,
            notes=f"Q(W + s·BA) as trained: INT{c.bits} group {c.group_size} RTN; reloaded from disk",
            format=f"INT{c.bits} g{c.group_size} RTN",
            deploy=intquant.int_forms(path, c.bits, c.group_size),
        )

    def report(self, model: torch.nn.Module) -> dict[str, Any]:
        return dict(self._metrics)
