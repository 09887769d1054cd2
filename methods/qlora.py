"""QLoRA (Dettmers et al. 2023, arXiv 2305.14314): LoRA adapters on a frozen base quantized to 4 bits.

Each linear weight is quantized block-wise (``blocksize`` consecutive values share one absmax scale) to
4-bit NF4 (quantiles of a normal distribution, information-theoretically optimal for normally distributed
weights) or FP4. Double quantization quantizes the fp32 absmax constants again, to 8 bits in blocks of 256
with one fp32 scale each, cutting the constants from 32/64 = 0.5 to 8/64 + 32/(64·256) ≈ 0.127 bits per
parameter (blocksize 64). The forward pass dequantizes on the fly to ``compute_dtype``; LoRA's update is
added in full precision: h = dequant(W_q) x + (alpha / r) · B A x.

The base is quantized from the *same* weights the other methods start from (not a separately quantized
checkpoint), so the comparison is like for like. The classification head and embeddings stay unquantized.

Merging a LoRA update into a 4-bit base is lossy: W' = quant(dequant(W_q) + ΔW) re-rounds every weight.
``export`` writes (a) the adapter, (b) the merged-and-requantized 4-bit model and (c) the adapter merged
into 32-bit weights, and the runner evaluates (b) and (c) beside the unmerged model (a).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator

from harness.contract import Deployable, Export, MemoryModel, MethodBase, ModelContext, attempt, register_method
from harness.lazy import lazy_module
from harness.schema import AutoDtype
from methods.common import (
    adapter_on_base,
    check_peft_fits,
    dir_bytes,
    export_peft,
    kept_float,
    need_linears,
    pretrained_forms,
    requires_grad_parameters,
    save_state_dict,
    with_heads,
)
from methods.lora import LoraOptions, peft_targets

lora_init = lazy_module("methods.lora_init")
torch = lazy_module("torch")  # imported at first use: the config validates without it (harness/lazy.py)


INITS = ("gaussian", "pissa", "loftq")  # init_lora_weights' names (besides PEFT's true / false)
ON_FLOAT_BASE = "adapter on the fp32 base"  # the deployable form of the adapter on the unquantized base
IN_MEMORY = "in memory: ftbench has no disk loader for bitsandbytes 4-bit weights, so load time is not measured"


class QLoraOptions(LoraOptions):
    """QLoRA's options: LoRA's, plus the 4-bit format, double quantization and block size."""

    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type")
    double_quant: bool = Field(True, description="quantize the absmax constants again (8-bit, blocks of 256)")
    blocksize: Literal[32, 64, 128, 256, 512, 1024, 2048, 4096] = Field(64, description="values per absmax")
    compute_dtype: Annotated[Literal["auto", "float32", "bfloat16", "float16"], AutoDtype()] = Field(
        "float32", description="dequantize to this; auto: a half-precision train.dtype, else bf16 where native"
    )
    skip_modules: list[str] = Field(
        default_factory=list, description="Linear names (or top-level modules) kept unquantized (+ the head)"
    )
    init_lora_weights: bool | str = Field(
        True,
        description="the adapter's init: PEFT's (true: kaiming A, zero B; false: random B; gaussian), or from the "
        "float weights before quantization: pissa (QPiSSA: principal components, residual quantized) or loftq "
        "(Q + BA ≈ W)",
    )
    loftq_iter: int = Field(1, ge=1, le=10, description="loftq: alternating quantize / SVD steps (PEFT's default 1)")
    export_merged_4bit: bool = Field(
        True,
        description="also export merged and requantized to this 4-bit format, evaluated (requantizing loses "
        "accuracy); the adapter and the merged float32 model are always exported",
    )
    export_int_bits: Literal[2, 3, 4, 8] | list[Literal[2, 3, 4, 8]] | None = Field(
        None, description="also export merged + requantized to group-wise INT-N (RTN), QA-LoRA's format; a list: each"
    )
    export_int_group_size: Literal[16, 32, 64, 128] = Field(32, description="group size of that INT-N export")
    export_int_quantizer: Literal["rtn", "gptq"] = Field(
        "rtn", description="how that export requantizes: rtn, or gptq on training examples (extra ftbench[gptq])"
    )

    @field_validator("init_lora_weights")
    @classmethod
    def _init_known(cls, v: bool | str) -> bool | str:
        if isinstance(v, str) and v not in INITS:
            raise ValueError(f"allowed: true, false, {', '.join(INITS)} (got {v!r})")
        return v

    @field_validator("export_int_quantizer")
    @classmethod
    def _quantizer_installed(cls, v: str) -> str:
        from harness.libs import gptqmodel_installed

        if v == "gptq" and not gptqmodel_installed():
            raise ValueError("export_int_quantizer 'gptq' needs the extra gptqmodel: pip install 'ftbench[gptq]'")
        return v


def quantize_linears(
    model: torch.nn.Module, skip: set[str], cfg: QLoraOptions, error: list[float] | None = None
) -> list[str]:
    """Replace every ``nn.Linear`` (except ``skip``: a layer's last name, its path or a module it is in, such as
    RoBERTa's two-Linear ``classifier``) by a bitsandbytes ``Linear4bit`` quantized from its current weights.
    Returns the quantized module names. With ``error`` (a list [sum of squared errors, sum of squares]), each
    layer's quantization error is added to it as it is quantized: no copy of the float weights outlives it."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as F

    from harness.contract import within
    from harness.measure.hardware import torch_dtype

    done = []
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            path = f"{parent_name}.{name}" if parent_name else name
            if not isinstance(child, torch.nn.Linear) or within(path, skip):
                continue
            q = bnb.nn.Linear4bit(
                child.in_features,
                child.out_features,
                bias=child.bias is not None,
                compute_dtype=torch_dtype(cfg.compute_dtype),
                compress_statistics=cfg.double_quant,
                quant_type=cfg.quant_type,
            )
            q.weight = bnb.nn.Params4bit(
                child.weight.data.detach().clone().float(),
                requires_grad=False,
                compress_statistics=cfg.double_quant,
                quant_type=cfg.quant_type,
                blocksize=cfg.blocksize,
                module=q,
            )
            if child.bias is not None:
                q.bias = torch.nn.Parameter(child.bias.data.detach().clone(), requires_grad=False)
            q = q.to(child.weight.device)  # moving a Params4bit quantizes it
            if error is not None:
                w = child.weight.detach().float()
                error[0] += float((F.dequantize_4bit(q.weight.data, q.weight.quant_state).float() - w).pow(2).sum())
                error[1] += float(w.pow(2).sum())
            # bitsandbytes repacks 4-bit weights for a faster inference kernel on AVX512-BF16 CPUs at the first
            # eval-mode forward; training afterwards breaks (in-place error with a bias, silently None LoRA grads
            # without one). ftbench evaluates before training, so the repacking must never happen.
            q.support_avx512bf16_for_cpu = False
            setattr(parent, name, q)
            done.append(path)
    return done


def quantized_storage(model: torch.nn.Module) -> dict[str, Any]:
    """Bytes of packed 4-bit weights and of quantization constants, and bits per quantized parameter.
    Constants = absmax (fp32 per block, or uint8 with double quantization) + the nested fp32 absmax and offset;
    the fixed lookup tables (16 NF4/FP4 codes, 256 nested codes per layer) are counted separately, as the
    paper does, because they do not grow with the layer."""
    import bitsandbytes as bnb

    packed = consts = codes = n = 0
    for mod in model.modules():
        if not isinstance(mod, bnb.nn.Linear4bit):
            continue
        w, qs = mod.weight, mod.weight.quant_state
        n += torch.Size(qs.shape).numel()
        packed += w.untyped_storage().nbytes()
        consts += qs.absmax.numel() * qs.absmax.element_size()
        codes += qs.code.numel() * qs.code.element_size()
        if qs.nested:
            consts += qs.state2.absmax.numel() * qs.state2.absmax.element_size() + qs.offset.numel() * 4
            codes += qs.state2.code.numel() * qs.state2.code.element_size()
    return {
        "quantized_params": n,
        "packed_weight_bytes": packed,
        "quant_constant_bytes": consts,
        "quant_code_table_bytes": codes,
        "bits_per_quantized_param": 8 * (packed + consts) / n if n else None,
    }


def _dequantized_linear(layer: torch.nn.Module, delta: torch.Tensor | None = None) -> torch.nn.Linear:
    import bitsandbytes.functional as F

    lin = torch.nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
    w = F.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
    lin.weight.data = w if delta is None else w + delta.float()
    if layer.bias is not None:
        lin.bias.data = layer.bias.data.detach().float().clone()
    return lin.requires_grad_(False)


def merged_full_precision(model: torch.nn.Module) -> torch.nn.Module:
    """The adapter merged into 32-bit weights: W' = dequant(W_q) + ΔW for adapted layers, dequant(W_q) elsewhere.
    Only float rounding separates it from the unmerged model."""
    import bitsandbytes as bnb
    from peft.tuners.lora import LoraLayer

    m = copy.deepcopy(model)
    for mod in list(m.modules()):
        if isinstance(mod, LoraLayer) and isinstance(mod.get_base_layer(), bnb.nn.Linear4bit):
            deltas = [mod.get_delta_weight(a) for a in mod.active_adapters]
            mod.base_layer = _dequantized_linear(mod.get_base_layer(), sum(deltas))
    m = m.unload()  # adapters are already folded in: drop the wrappers without merging again
    for parent in list(m.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, bnb.nn.Linear4bit):
                setattr(parent, name, _dequantized_linear(child))
    return m


@register_method
class QLora(MethodBase):
    """QLoRA (Dettmers et al. 2023): LoRA on a 4-bit NF4/FP4 base, optional double quantization."""

    name = "qlora"
    Config = QLoraOptions

    def __init__(self, config: QLoraOptions) -> None:
        self.config = config
        self._metrics: dict[str, Any] = {}
        self._quantized: list[str] = []
        self._calibration = self._load_base = None

    def memory_model(self) -> MemoryModel:
        """4 bits per weight plus one fp32 absmax per block, or, double-quantized, an 8-bit absmax per block plus
        one fp32 constant per 256 blocks (QLoRA paper, §2: 4.127 bits at blocks of 64)."""
        b = self.config.blocksize
        constants = 8 / b + 32 / (b * 256) if self.config.double_quant else 32 / b
        targets = peft_targets(self.config.target_modules)
        return MemoryModel(trains="adapters", rank=self.config.r, linear_bits=4 + constants, targets=targets)

    def check_model(self, model: torch.nn.Module, ctx: ModelContext) -> None:  # the adapters' fit; 4 bits fit any
        need_linears(model, set(ctx.head_names) | set(ctx.output_names) | set(self.config.skip_modules), "qlora")
        check_peft_fits(model, self.config.lora_config(task_type=ctx.peft_task_type))

    def prepare(self, model: torch.nn.Module, ctx: ModelContext) -> torch.nn.Module:
        skip = set(ctx.head_names) | set(ctx.output_names) | set(self.config.skip_modules) | kept_float(model)
        init = self.config.init_lora_weights
        adapters: dict = {}
        if init == "pissa":  # made on the float weights; the residual left behind is what gets quantized
            cfg = self.config.lora_config(task_type=ctx.peft_task_type, init_lora_weights="pissa")
            model, adapters, originals = lora_init.init_on_float(model, cfg)
        elif init == "loftq":
            cfg = self.config.lora_config(task_type=ctx.peft_task_type)
            model, adapters, originals = lora_init.loftq(model, cfg, self._nf4_roundtrip, self.config.loftq_iter)
        error = [0.0, 0.0]  # layer by layer: a copy of every float weight at once would double the load's peak
        names = quantize_linears(model, skip, self.config, error)
        self._quantized = names
        self._calibration, self._load_base = ctx.calibration, ctx.load_base
        if not names:
            raise ValueError("qlora: no Linear layer left to quantize (check skip_modules)")
        for p in model.parameters():
            p.requires_grad_(False)
        self._metrics = {
            **quantized_storage(model),
            "quantized_modules": len(names),
            "quant_relative_error": (error[0] / error[1]) ** 0.5 if error[1] else float("nan"),
            "quant_type": self.config.quant_type,
            "double_quant": self.config.double_quant,
            "blocksize": self.config.blocksize,
            "compute_dtype": self.config.compute_dtype,
        }
        model.is_loaded_in_4bit = True  # tells peft to wrap the bnb layers with its 4-bit-aware LoRA layers
        # LoraConfig's own default would target only query/value; keep the user's choice as is.
        from peft import get_peft_model

        plain = True if init in ("pissa", "loftq") else init  # pissa / loftq: replaced below by the float-made adapters
        peft_model = get_peft_model(
            model, with_heads(self.config.lora_config(task_type=ctx.peft_task_type, init_lora_weights=plain), ctx)
        )
        if adapters:
            self._metrics["init_relative_error"] = lora_init.put_adapters(peft_model, adapters, originals)
        self._metrics["init_lora_weights"] = init
        return peft_model

    def _nf4_roundtrip(self, w: torch.Tensor) -> torch.Tensor:
        """``w`` quantized exactly as :func:`quantize_linears` will quantize the base, then dequantized."""
        import bitsandbytes.functional as F

        c = self.config
        q, state = F.quantize_4bit(
            w.float().contiguous(), blocksize=c.blocksize, compress_statistics=c.double_quant, quant_type=c.quant_type
        )
        return F.dequantize_4bit(q, state).float()

    def compute_dtype(self) -> str:
        return self.config.compute_dtype  # the dequantized matmuls' dtype (resolved from `auto` by then)

    def trainable_parameters(self, model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
        return requires_grad_parameters(model)

    def export(self, model: torch.nn.Module, out_dir: Path) -> list[Export]:
        """(a) adapter; (b) merged + requantized 4-bit (bitsandbytes state dict, safetensors), unless the config says
        not; (c) merged fp32; (d) merged + requantized INT-N where asked."""
        out = export_peft(model, out_dir, mergeable=False)
        dtype = self.config.compute_dtype
        c = self.config
        out[0].deploy = [
            Deployable(f"{c.quant_type} + adapter", dtype, model=model, note=IN_MEMORY),
            self._on_the_float_base(out[0].path),
        ]
        out[0].notes = (
            f"trained on a {c.quant_type.upper()} 4-bit base (bitsandbytes, blocksize {c.blocksize}"
            f"{', double quantization' if c.double_quant else ''}): on a full-precision base, as loaded above, its "
            "scores differ from the trained model's by the base's quantization error (the deployment form "
            f"'{ON_FLOAT_BASE}' measures by how much); load the base in that 4-bit format to serve it as trained, "
            "or serve merged_fp32"
        )
        if self.config.export_merged_4bit:
            out.append(attempt("merged_4bit", out_dir / "merged_4bit", lambda: self._export_merged4(model, out_dir)))
        merged32 = merged_full_precision(model)
        path32 = out_dir / "merged_fp32"

        def fp32() -> Export:
            merged32.save_pretrained(path32, safe_serialization=True)
            return Export(
                "merged_fp32",
                path32,
                dir_bytes(path32),
                model=merged32,
                notes="adapter merged into dequantized 32-bit weights (exact up to float rounding)",
                deploy=pretrained_forms(path32, type(merged32)),
            )

        out.append(attempt("merged_fp32", path32, fp32))
        bits = self.config.export_int_bits
        for b in sorted(set(bits if isinstance(bits, list) else [bits] if bits else []), reverse=True):
            out.append(
                attempt(
                    f"merged_int{b}", out_dir / f"merged_int{b}", lambda b=b: self._export_int(merged32, out_dir, b)
                )
            )
        return out

    def _on_the_float_base(self, path: Path) -> Deployable:
        """The adapter on the unquantized base, both from disk: how an adapter is usually loaded and served."""
        if (init := self.config.init_lora_weights) in ("pissa", "loftq"):  # made on W, the residual quantized
            why = f"a {init} adapter belongs on the base ftbench quantized (W minus its principal part), not on W"
            return Deployable(ON_FLOAT_BASE, skipped=why)
        return adapter_on_base(ON_FLOAT_BASE, path, self._load_base, "the base as loaded before quantization")

    def _export_merged4(self, model: torch.nn.Module, out_dir: Path) -> Export:
        """Merged and requantized to the base's own 4-bit format, held in memory for evaluation."""
        c = self.config
        merged4 = copy.deepcopy(model).merge_and_unload()  # peft: dequantize → add ΔW → requantize, per layer
        path4 = out_dir / "merged_4bit"
        path4.mkdir(parents=True, exist_ok=True)
        save_state_dict(
            merged4, path4 / "model.safetensors", {"format": "bitsandbytes-4bit", "quant_type": self.config.quant_type}
        )
        return Export(
            "merged_4bit",
            path4,
            dir_bytes(path4),
            model=merged4,
            notes="dequantize → add ΔW → requantize to the same 4-bit format (lossy)",
            format=f"{c.quant_type.upper()} b{c.blocksize}{' DQ' if c.double_quant else ''}",
            deploy=[
                Deployable(f"{self.config.quant_type} merged", self.config.compute_dtype, model=merged4, note=IN_MEMORY)
            ],
        )

    def _export_int(self, merged32: torch.nn.Module, out_dir: Path, bits: int) -> Export:
        """QLoRA's deployment route to an integer model: merge in full precision, then quantize group-wise to
        INT-N with RTN — the point of comparison for QA-LoRA's exact merge (paper: QLoRA + GPTQ vs QA-LoRA)."""
        from methods.intquant import QuantLinear, int_forms, load_merged, save_int_model

        c = self.config
        g = c.export_int_group_size
        m = copy.deepcopy(merged32)
        targets = [(name, m.get_submodule(name)) for name in self._quantized]
        for name, lin in targets:
            if lin.in_features % g:
                raise ValueError(f"qlora: export_int_group_size {g} does not divide d_in={lin.in_features} of {name!r}")
        if c.export_int_quantizer == "gptq":  # the paper's QLoRA baseline: merge, then GPTQ
            from methods.gptq import gptq_quantize

            batches = self._calibration(64) if self._calibration else []
            if not batches:
                raise ValueError("qlora: export_int_quantizer gptq needs calibration data, and the runner gave none")
            gptq_quantize(m, targets, batches, bits, g, torch.float16, torch.float32)  # swaps the layers in m
        else:
            for name, lin in targets:
                parent, _, attr = name.rpartition(".")
                q = QuantLinear.from_linear(lin, bits, g, torch.float16, torch.float32)
                setattr(m.get_submodule(parent) if parent else m, attr, q)
        path = out_dir / f"merged_int{bits}"
        save_int_model(m, self._quantized, path, bits, g, "float16", "float32")
        return Export(
            f"merged_int{bits}",
            path,
            dir_bytes(path),
            model=load_merged(path),
            notes=f"merged in fp32, then requantized to INT{bits} group {g} ({c.export_int_quantizer.upper()})",
            format=f"INT{bits} g{g} {c.export_int_quantizer.upper()}",
            deploy=int_forms(path, bits, g),
        )

    def report(self, model: torch.nn.Module) -> dict[str, Any]:
        return dict(self._metrics)
