"""Group-wise asymmetric INT-N weight quantization, bit packing, and the quantized linear layer QA-LoRA uses.

A weight W (d_out × d_in) is cut into groups of ``group_size`` consecutive input channels per output row.
Each group j of row i has a scale s_ij and a floating-point zero point z_ij, and its weights are integers
q ∈ [0, 2^bits − 1]:

    w = s · q + z                      (min-max round-to-nearest: s = (max − min) / (2^bits − 1), z = min)

Zero points are stored as floats, not integers: QA-LoRA's merge adds a per-(row, group) constant to them,
which is no longer an integer multiple of the scale. Integers are bit-packed (8 values into ``bits`` bytes),
so storage is exactly ``bits`` bits per weight plus 2 × 16 / group_size bits of fp16 scale and zero
(INT4, group 32: 4 + 1 = 5.0 bits per parameter).

For INT4 inference torch ships a CPU kernel with group-wise scale and float zero,
``_weight_int4pack_mm_for_cpu`` (w = (q − 8) · scale + zero'), so a merged model runs on it as is,
with zero' = z + 8 · s.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from harness.measure.hardware import DTYPES, torch_dtype
from methods.common import load_state_dict, save_state_dict

BITS = (2, 3, 4, 8)
FORMAT = "ftbench-int-groupwise-v1"  # save_int_model / load_merged


def quantize_rtn(w: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Min-max round-to-nearest per group. Returns integer q (d_out × d_in, uint8), scale and zero (d_out × groups)."""
    d_out, d_in = w.shape
    g = w.float().reshape(d_out, d_in // group_size, group_size)
    lo, hi = g.amin(-1), g.amax(-1)
    levels = 2**bits - 1
    scale = ((hi - lo) / levels).clamp(min=1e-10)
    q = torch.round((g - lo[..., None]) / scale[..., None]).clamp(0, levels)
    return q.reshape(d_out, d_in).to(torch.uint8), scale, lo


def dequantize(
    q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Integers, scales and zero points back to a float weight."""
    d_out, d_in = q.shape
    g = q.reshape(d_out, d_in // group_size, group_size).to(dtype)
    return (g * scale.to(dtype)[..., None] + zero.to(dtype)[..., None]).reshape(d_out, d_in)


def pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integers < 2^bits, 8 at a time, into ``bits`` bytes (exactly ``bits`` bits per value)."""
    flat = q.reshape(-1).to(torch.int64)
    pad = (-flat.numel()) % 8
    flat = torch.cat([flat, flat.new_zeros(pad)]).reshape(-1, 8)
    word = (flat << (torch.arange(8, device=flat.device) * bits)).sum(-1)  # up to 64 bits: 8 values × bits
    return ((word[:, None] >> (torch.arange(bits, device=word.device) * 8)) & 0xFF).to(torch.uint8).reshape(-1)


def unpack(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Bit-packed integers back to one integer per weight."""
    if 8 % bits == 0:  # whole values per byte (1, 2, 4, 8 bits): value k of byte j sits at bit k·bits, so the
        # bytes unpack in uint8 without the 64-bit words below (4 bits: 3.7× faster on a 1536×384 weight), one
        # shift per value slot rather than a broadcast shift (1.6× faster again; the top slot needs no mask)
        parts = [packed >> k if k + bits == 8 else (packed >> k) & (2**bits - 1) for k in range(0, 8, bits)]
        return torch.stack(parts, -1).reshape(-1)[:numel]
    b = packed.reshape(-1, bits).to(torch.int64)
    word = (b << (torch.arange(bits, device=b.device) * 8)).sum(-1)
    vals = (word[:, None] >> (torch.arange(8, device=word.device) * bits)) & (2**bits - 1)
    return vals.reshape(-1)[:numel].to(torch.uint8)


class QuantLinear(torch.nn.Module):
    """A frozen group-wise INT-N linear layer (packed integers, fp16/fp32 scale and float zero per group)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        group_size: int,
        bias: bool,
        param_dtype: torch.dtype = torch.float16,
        compute_dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        if in_features % group_size:
            raise ValueError(f"group_size {group_size} does not divide in_features {in_features}")
        self.in_features, self.out_features, self.bits, self.group_size = in_features, out_features, bits, group_size
        self.compute_dtype = compute_dtype
        groups = in_features // group_size
        n = in_features * out_features
        self.register_buffer("qweight", torch.zeros((n + 7) // 8 * bits, dtype=torch.uint8))
        self.register_buffer("scales", torch.zeros(out_features, groups, dtype=param_dtype))
        self.register_buffer("zeros", torch.zeros(out_features, groups, dtype=param_dtype))
        # the bias stays a float parameter (frozen), as in any Linear
        self.bias = torch.nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None
        self._int4 = None  # lazily built int4pack weight for the CPU INT4 kernel
        self.kernel = "dequant"  # or "int4": torch's CPU weight-only INT4 matmul (inference only)

    @classmethod
    def from_linear(
        cls, lin: torch.nn.Linear, bits: int, group_size: int, param_dtype: torch.dtype, compute_dtype: torch.dtype
    ) -> QuantLinear:
        m = cls(lin.in_features, lin.out_features, bits, group_size, lin.bias is not None, param_dtype, compute_dtype)
        q, scale, zero = quantize_rtn(lin.weight.detach(), bits, group_size)
        m.set_quantized(q, scale, zero)
        if lin.bias is not None:
            m.bias.data = lin.bias.detach().float().clone()
        return m

    def set_quantized(self, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> None:
        self.qweight = pack(q, self.bits)
        self.scales = scale.to(self.scales.dtype)
        self.zeros = zero.to(self.zeros.dtype)
        self._int4 = None

    def int_weight(self) -> torch.Tensor:
        return unpack(self.qweight, self.bits, self.in_features * self.out_features).reshape(
            self.out_features, self.in_features
        )

    def weight_dequantized(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return dequantize(self.int_weight(), self.scales, self.zeros, self.group_size, dtype or self.compute_dtype)

    def quantized_numel(self) -> int:
        return self.in_features * self.out_features

    def storage_bytes(self) -> dict[str, int]:
        """Packed integers + scales and zeros (what bits per parameter counts; the bias is apart)."""
        return {
            "packed_weight_bytes": self.qweight.numel(),
            "scale_zero_bytes": self.scales.numel() * self.scales.element_size() * 2,
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel == "int4":
            return self.forward_int4_kernel(x)
        b = None if self.bias is None else self.bias.to(self.compute_dtype)
        return DequantMatmul.apply(x.to(self.compute_dtype), self, b).to(x.dtype)

    def int4_packed(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The weight in the kernel's layout, built once: int4pack integers, and (scale, zero') in bf16."""
        if self._int4 is None:
            q = self.int_weight().to(torch.int32)
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2)
            s, z = self.scales.float(), self.zeros.float()
            sz = torch.stack([s, z + 8 * s], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)
            self._int4 = (packed, sz)
        return self._int4

    def forward_int4_kernel(self, x: torch.Tensor) -> torch.Tensor:
        """INT4 only: torch's CPU weight-only INT4 matmul (bf16 activations); w = (q − 8)·s + (z + 8·s)."""
        if self.bits != 4:
            raise ValueError("the INT4 kernel needs bits=4")
        packed, sz = self.int4_packed()
        shape = x.shape
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(
            x.reshape(-1, shape[-1]).to(torch.bfloat16), packed, self.group_size, sz
        )
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bits={self.bits}, group_size={self.group_size}"


class DequantMatmul(torch.autograd.Function):
    """y = x · Wᵀ + b with W dequantized from the packed integers in forward, and again in backward.

    The weight is frozen, so backward needs only W for ∂x = ∂y · W: nothing is saved for it. Through autograd's
    own ``F.linear`` a dense W would be kept per layer until backward (SmolLM2: ~201 MiB of dense weights saved
    vs 57 MiB packed) and the peak would measure this implementation, not QA-LoRA. bitsandbytes' ``MatMul4Bit``
    does the same for QLoRA (Dettmers et al., 2023, §3)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: QuantLinear, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.layer = layer
        ctx.autocast = (
            x.device.type,
            torch.is_autocast_enabled(x.device.type),
            torch.get_autocast_dtype(x.device.type),
        )
        return torch.nn.functional.linear(x, layer.weight_dequantized(), bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        device, enabled, dtype = ctx.autocast
        with torch.autocast(device, dtype=dtype, enabled=enabled):  # the forward's precision, in backward too
            w = ctx.layer.weight_dequantized()
            grad_x = grad.to(w.dtype) @ w if ctx.needs_input_grad[0] else None
        return grad_x, None, None


def _is_causal(model: torch.nn.Module) -> bool:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return type(model).__name__ in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()


def set_module(model: torch.nn.Module, path: str, new: torch.nn.Module) -> None:
    """Replace the submodule at dotted ``path`` with ``new``."""
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, new)


def save_int_model(
    model: torch.nn.Module,
    layers: list[str],
    path: Path,
    bits: int,
    group_size: int,
    param_dtype: str,
    compute_dtype: str,
) -> None:
    """Write a model whose ``layers`` are QuantLinear in the format :func:`load_merged` reads."""
    path.mkdir(parents=True, exist_ok=True)
    save_state_dict(model, path / "model.safetensors")
    model.config.save_pretrained(path)
    meta = {
        "format": FORMAT,
        "task_type": "causal_lm" if _is_causal(model) else "seq_cls",
        "bits": bits,
        "group_size": group_size,
        "param_dtype": param_dtype,
        "compute_dtype": compute_dtype,
        "layers": layers,
        "formula": "w = scales[i, k // group_size] * q[i, k] + zeros[i, k // group_size]",
    }
    (path / "ftbench_quant.json").write_text(json.dumps(meta, indent=1))


def load_merged(path: Path) -> torch.nn.Module:
    """ftbench's loader for a merged QA-LoRA export: rebuild the architecture, put QuantLinear layers where the
    JSON says, load every tensor strictly."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    from harness.cell.models import built_for_loading

    meta = json.loads((Path(path) / "ftbench_quant.json").read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: not a {FORMAT} export")
    auto = AutoModelForCausalLM if meta.get("task_type") == "causal_lm" else AutoModelForSequenceClassification
    model = built_for_loading(auto, AutoConfig.from_pretrained(path))  # every tensor is loaded below
    for name in meta["layers"]:
        lin = model.get_submodule(name)
        set_module(
            model,
            name,
            QuantLinear(
                lin.in_features,
                lin.out_features,
                meta["bits"],
                meta["group_size"],
                lin.bias is not None,
                DTYPES[meta["param_dtype"]],
                torch_dtype(meta["compute_dtype"]),
            ),
        )
    load_state_dict(model, Path(path) / "model.safetensors")
    return model.eval()


INT4_KERNEL_GROUPS = (32, 64, 128, 256)  # the group sizes torch's CPU INT4 kernel takes


def int_forms(path: Path, bits: int, group_size: int) -> list:
    """A merged INT-N export deployed through ftbench's loader: dequantize-then-matmul (any bits), and for INT4
    at a group size the kernel takes, torch's CPU weight-only INT4 matmul (the deployment QA-LoRA aims at)."""
    from harness.contract import Deployable

    forms = [Deployable(f"int{bits} dequant", "float32", load=lambda: load_merged(path))]
    if bits == 4 and group_size in INT4_KERNEL_GROUPS and not torch.cuda.is_available():

        def kernel() -> torch.nn.Module:
            model = load_merged(path)
            for m in model.modules():
                if isinstance(m, QuantLinear):
                    m.kernel = "int4"
                    m.int4_packed()  # part of loading: the kernel's layout is built once
            return model

        note = "torch's _weight_int4pack_mm_for_cpu, bf16 activations; repacked at load"
        forms.append(Deployable("int4 kernel", "int4", load=kernel, note=note))
    elif bits == 4 and not torch.cuda.is_available():
        groups = ", ".join(map(str, INT4_KERNEL_GROUPS))
        why = f"torch's CPU INT4 kernel takes groups of {groups}; this export's group is {group_size}"
        forms.append(Deployable("int4 kernel", "int4", skipped=why))
    return forms
