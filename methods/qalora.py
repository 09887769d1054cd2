"""QA-LoRA (Xu et al., ICLR 2024, arXiv 2309.14717): quantization-aware LoRA with an exact, still-quantized merge.

The base is quantized group-wise to INT-N (see :mod:`methods.intquant`): w_ik = s_ij · q_ik + z_ij for input
channel k in group j = k // g. The adapter sees the input *pooled over each group*,

    h = W̃ x + (alpha / r) · B A P x,     P ∈ R^{(d_in/g) × d_in},  (P x)_j = Σ_{k ∈ group j} x_k,

so A is r × (d_in / g) and the update B A P is constant within each group: ΔW_ik = (alpha / r) · (B A)_{i, j(k)}.
That constant folds exactly into the group's zero point, z'_ij = z_ij + (alpha / r) · (B A)_ij: the merged
model keeps the same integers and scales, is still INT-N, and runs on quantized kernels.

Pooling constant: by default ftbench sums over the group, as the paper's Algorithm 1 does (P has ones);
``pooling: mean`` averages, as the authors' code does (``AvgPool1d``, P has entries 1/g), and its merge divides
by g. peft's ``use_qalora`` takes the mean and multiplies by d_in / g. An adapter trained under one convention
merges under the same one only; the merge always follows the forward. At ``group_size: 1`` pooling is the
identity and QA-LoRA is LoRA on the quantized base (each weight its own group: the fp16-rounded weight).

On-disk format of the merged model (``merged_int/``): ``model.safetensors`` holds, per quantized layer,
``qweight`` (uint8, 8 integers packed into ``bits`` bytes, row-major over d_out × d_in), ``scales`` and
``zeros`` (d_out × d_in/g, fp16 by default; zeros are floats since merged zero points are not integers) and
``bias``; every other tensor as is. ``config.json`` is the transformers config; ``ftbench_quant.json`` names
the quantized layers, bits, group size and the formula. :func:`methods.intquant.load_merged` reads it back.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator

from harness.contract import Export, MemoryModel, MethodBase, ModelContext, attempt, register_method, within
from harness.lazy import lazy_module
from harness.libs import gptqmodel_installed
from harness.schema import AutoDtype, Strict
from methods.common import conv1d_note, dir_bytes, kept_float, requires_grad_parameters

ADAPTER_NOTE = (
    "ftbench's QA-LoRA adapter (the group-pooled A and B, `adapter.safetensors`, and the method's config): it applies "
    "only to the base quantized as in training; merged_int, beside it, is the model to serve"
)

# Imported at first use, so that the config validates without torch (harness/lazy.py). The layers live in
# methods/qalora_layer.py and methods/intquant.py, which define torch modules and so import torch themselves.
torch = lazy_module("torch")
layers = lazy_module("methods.qalora_layer")
intquant = lazy_module("methods.intquant")
gptq = lazy_module("methods.gptq")
hardware = lazy_module("harness.measure.hardware")
safetensors_torch = lazy_module("safetensors.torch")


class QALoraOptions(Strict):
    """QA-LoRA's options: rank, bits, group size, quantizer, targets, compute dtype."""

    r: int = Field(8, gt=0, description="adapter rank")
    alpha: float = Field(16, gt=0, description="updates are scaled by alpha / r")
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: list[str] | None = Field(None, description="Linear names to quantize+adapt; None = all but head")
    skip_modules: list[str] = Field(
        default_factory=list, description="Linear names (last component or full path) left in float, not adapted"
    )
    bits: Literal[2, 3, 4, 8] = 4
    group_size: Literal[1, 2, 4, 8, 16, 32, 64, 128] = Field(
        32, description="input channels per quantization group and per pooled adapter input; 1: LoRA on the INT-N base"
    )
    pooling: Literal["sum", "mean"] = Field(
        "sum", description="how the adapter pools each group: sum (paper, Algorithm 1) or mean (authors' AvgPool1d)"
    )
    a_init: Literal["kaiming", "xavier"] = Field(
        "kaiming", description="A's initialisation: kaiming as LoRA, over fan-in d_in/g; xavier as the authors' code"
    )
    dropout_after_pooling: bool = Field(
        False, description="apply dropout to the pooled input (authors' code) rather than before pooling (paper)"
    )
    quantizer: Literal["rtn", "gptq"] = Field(
        "rtn", description="rtn: min-max round-to-nearest; gptq: GPTQ on training examples (extra ftbench[gptq])"
    )
    calibration_examples: int = Field(64, gt=0, description="gptq: training examples it calibrates on")

    @field_validator("quantizer")
    @classmethod
    def _quantizer_installed(cls, v: str) -> str:
        if v == "gptq" and not gptqmodel_installed():
            raise ValueError("quantizer 'gptq' needs the optional extra gptqmodel: pip install 'ftbench[gptq]'")
        return v

    param_dtype: Literal["float16", "float32"] = Field("float16", description="dtype of stored scales and zeros")
    compute_dtype: Annotated[Literal["auto", "float32", "bfloat16", "float16"], AutoDtype()] = Field(
        "float32", description="dequantize to this; auto: a half-precision train.dtype, else bf16 where native"
    )


def linear_targets(
    model: torch.nn.Module, ctx_heads: set[str], names: list[str] | None, skip: list[str] = ()
) -> list[tuple[str, torch.nn.Linear]]:
    """(path, Linear) of every layer ``names`` picks (None: all), except the heads and ``skip`` (last name or path)."""
    out, heads = [], {*ctx_heads, *kept_float(model)}  # a head trains in full; T5's `wo` stays float
    for path, mod in model.named_modules():
        last = path.split(".")[-1]
        if not isinstance(mod, torch.nn.Linear) or within(path, heads):
            continue
        if (names is None or last in names or path in names) and not (last in skip or path in skip):
            out.append((path, mod))
    return out


@register_method
class QALora(MethodBase):
    """QA-LoRA (Xu et al. 2024): group-wise INT-N base, group-pooled LoRA, exact merge into zero points."""

    name = "qalora"
    Config = QALoraOptions

    def __init__(self, config: QALoraOptions) -> None:
        self.config = config
        self._metrics: dict[str, Any] = {}
        self._layers: list[str] = []

    def memory_model(self) -> MemoryModel:
        """INT-N weights with an fp16 scale and zero point per group, and adapters whose inputs are pooled per
        group (QA-LoRA paper, §3.3): r·(d_in/g + d_out) per targeted linear."""
        c = self.config
        targets = tuple(c.target_modules) if c.target_modules else None
        # its DequantMatmul saves nothing and its adapter reads the pooled input: no full-width input is kept
        return MemoryModel(
            "adapters", c.r, c.bits + 32 / c.group_size, c.group_size, targets, saves_linear_inputs=False
        )

    def check_model(self, model: torch.nn.Module, ctx: ModelContext) -> None:
        self._check(model, set(ctx.head_names) | set(ctx.output_names))

    def _check(self, model: torch.nn.Module, heads: set[str]) -> None:
        c = self.config
        targets = linear_targets(model, heads, c.target_modules, c.skip_modules)
        if not targets:
            raise ValueError(f"qalora: no Linear layer matches target_modules={c.target_modules}{conv1d_note(model)}")
        names = {n for path, _ in model.named_modules() for n in (path, path.split(".")[-1])}
        unknown = [s for s in c.skip_modules if s not in names]
        if unknown:
            raise ValueError(f"qalora: skip_modules names no module of this model: {', '.join(map(repr, unknown))}")
        for path, lin in targets:
            if lin.in_features % c.group_size:
                raise ValueError(
                    f"qalora: group_size {c.group_size} does not divide d_in={lin.in_features} of layer "
                    f"{path!r}; choose a group_size that divides every targeted layer's d_in"
                )

    def prepare(self, model: torch.nn.Module, ctx: ModelContext) -> torch.nn.Module:
        c = self.config
        keep = set(ctx.head_names) | set(ctx.output_names)  # heads train in full; a decoder's LM head stays as is
        self._check(model, keep)
        targets = linear_targets(model, keep, c.target_modules, c.skip_modules)
        for p in model.parameters():
            p.requires_grad_(False)
        err = ref = 0.0
        n = packed = consts = 0
        self._quantized: dict[str, str] = {}  # each layer's integers and scales as quantized, before training
        by_gptq = None
        if c.quantizer == "gptq":
            if ctx.calibration is None:
                raise ValueError("qalora: quantizer gptq needs calibration data, and the runner gave none")
            by_gptq = gptq.gptq_quantize(
                model,
                targets,
                ctx.calibration(c.calibration_examples),
                c.bits,
                c.group_size,
                intquant.DTYPES[c.param_dtype],
                hardware.torch_dtype(c.compute_dtype),
            )
        for path, lin in targets:
            q = (
                by_gptq[path]
                if by_gptq
                else intquant.QuantLinear.from_linear(
                    lin, c.bits, c.group_size, intquant.DTYPES[c.param_dtype], hardware.torch_dtype(c.compute_dtype)
                )
            )
            w = lin.weight.detach().float()
            err += float((q.weight_dequantized(torch.float32) - w).pow(2).sum())
            ref += float(w.pow(2).sum())
            n += w.numel()
            packed += q.storage_bytes()["packed_weight_bytes"]
            consts += q.storage_bytes()["scale_zero_bytes"]
            self._quantized[path] = layers.digest(q)
            adapted = layers.QALoraLinear(q, c.r, c.alpha, c.dropout, c.pooling, c.a_init, c.dropout_after_pooling)
            intquant.set_module(model, path, adapted)
        for name in ctx.head_names:  # the classifier head trains in full, as with LoRA
            for p in model.get_submodule(name).parameters():
                p.requires_grad_(True)
        self._layers = [p for p, _ in targets]
        self._metrics = {
            "quantized_params": n,
            "packed_weight_bytes": packed,
            "scale_zero_bytes": consts,
            "bits_per_quantized_param": 8 * (packed + consts) / n,
            "quant_relative_error": (err / ref) ** 0.5,
            "quantized_modules": len(targets),
            "bits": c.bits,
            "group_size": c.group_size,
            "pooling": c.pooling,
            "a_init": c.a_init,
            "quantizer": c.quantizer,
        }
        return model

    def compute_dtype(self) -> str:
        return self.config.compute_dtype  # the dequantized matmuls' dtype (resolved from `auto` by then)

    def trainable_parameters(self, model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
        return requires_grad_parameters(model)

    def merged_model(self, model: torch.nn.Module) -> torch.nn.Module:
        merged = copy.deepcopy(model)
        for path in self._layers:
            intquant.set_module(merged, path, merged.get_submodule(path).merged())
        return merged.eval()

    def export(self, model: torch.nn.Module, out_dir: Path) -> list[Export]:
        adapter_dir = out_dir / "adapter"
        adapter_dir.mkdir(parents=True, exist_ok=True)
        safetensors_torch.save_file(
            {n: p.detach().contiguous() for n, p in self.trainable_parameters(model)},
            adapter_dir / "adapter.safetensors",
        )
        (adapter_dir / "adapter_config.json").write_text(json.dumps(self.config.model_dump(), indent=1))

        return [
            Export("adapter", adapter_dir, dir_bytes(adapter_dir), notes=ADAPTER_NOTE),
            attempt("merged_int", out_dir / "merged_int", lambda: self._export_merged(model, out_dir / "merged_int")),
        ]

    def _export_merged(self, model: torch.nn.Module, path: Path) -> Export:
        """The adapter folded into the zero points, written, read back from disk and checked against the
        integers quantized before training."""
        merged = self.merged_model(model)
        c = self.config
        intquant.save_int_model(merged, self._layers, path, c.bits, c.group_size, c.param_dtype, c.compute_dtype)
        device = next(model.parameters()).device  # the trained model's (CUDA in a GPU run): compare them there
        reloaded = intquant.load_merged(path).to(device)
        # the exported integers and scales, read back from disk, against those quantized before training
        same_ints = all(layers.digest(reloaded.get_submodule(p)) == self._quantized[p] for p in self._layers)
        from harness.cell.models import probe_ids

        ids = probe_ids(model, (8, 64), 0, device)
        batch = {"input_ids": ids, "attention_mask": torch.ones(8, 64, dtype=torch.long, device=device)}
        model.eval()
        with torch.no_grad():
            ref = model(**batch).logits.float()
            diff = float((reloaded(**batch).logits.float() - ref).abs().max())
        self._metrics.update(
            integer_weights_unchanged=same_ints,
            merged_vs_unmerged_max_abs_diff_random=diff,
            bits_per_quantized_param_merged=self._bits(reloaded),
        )  # latency: each deployable form (int_forms) is timed by harness/cell/deploy.py, the one latency timer
        return Export(
            "merged_int",
            path,
            dir_bytes(path),
            model=reloaded,
            notes="adapter folded into float zero points; integers unchanged; reloaded from disk",
            format=f"INT{c.bits} g{c.group_size} {c.quantizer.upper()}",
            deploy=intquant.int_forms(path, c.bits, c.group_size),
        )

    def _bits(self, model: torch.nn.Module) -> float:
        n = b = 0
        for p in self._layers:
            q = model.get_submodule(p)
            n += q.in_features * q.out_features
            b += sum(q.storage_bytes().values())
        return 8 * b / n

    def report(self, model: torch.nn.Module) -> dict[str, Any]:
        return dict(self._metrics)
