"""GPTQ (Frantar et al. 2023, arXiv 2210.17323) as a quantizer for QA-LoRA's group-wise INT-N base.

GPTQ quantizes a layer's weight column by column and, after each column, updates the not-yet-quantized
columns to compensate for its rounding error, using the inverse Hessian H = 2·XᵀX of the layer's inputs X on
calibration data. It minimises ||WX − Q(W)X|| rather than ||W − Q(W)||, which is why it beats
round-to-nearest at 3 and 2 bits.

The algorithm is gptqmodel's (the maintained successor of auto-gptq; optional extra ``ftbench[gptq]``), used
per layer through its module-level API — ``GPTQ(linear, QuantizeConfig)``, ``add_batch(inp, out)``,
``quantize()`` — the same entry point transformers/optimum use. ftbench drives the calibration itself, block
by block in model order: the inputs of block i are computed with blocks < i already quantized (auto-gptq's
``true_sequential=False`` order), and each calibration forward stops right after the block being measured.

gptqmodel returns integer zero points z: w = s · (q − z). ftbench's format is w = s · q + z' with a float
zero z' = −s · z (QA-LoRA's merge later adds its update to z'), so the integers carry over unchanged.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable

import torch

from harness.libs import environment_kept, gptqmodel_installed, import_gptqmodel_quietly
from methods.intquant import QuantLinear

_BLOCK = re.compile(r"^(.*?\.\d+)\.")  # "model.layers.3.self_attn.q_proj" -> "model.layers.3"


class _StopForward(Exception):
    pass


def gptq_available() -> bool:
    """Whether gptqmodel can be imported (the optional ``gptq`` extra)."""
    return gptqmodel_installed()


def _import_gptq():
    try:
        config, gptq = import_gptqmodel_quietly("gptqmodel.quantization.config", "gptqmodel.quantization.gptq")
    except ImportError as err:
        raise RuntimeError(f"quantizer 'gptq' needs the optional extra: pip install 'ftbench[gptq]' ({err})") from err
    return gptq.GPTQ, config.QuantizeConfig


def _blocks(targets: list[tuple[str, torch.nn.Linear]]) -> list[list[tuple[str, torch.nn.Linear]]]:
    """Targets grouped by the repeated block they sit in (model order); layers outside blocks come alone."""
    out: list[list[tuple[str, torch.nn.Linear]]] = []
    keys: list[str] = []
    for path, lin in targets:
        m = _BLOCK.match(path)
        key = m.group(1) if m else path
        if keys and keys[-1] == key:
            out[-1].append((path, lin))
        else:
            keys.append(key)
            out.append([(path, lin)])
    return out


def _to_ftbench(q_fake: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, group_size: int):
    """gptqmodel's (dequantized weight, scale, integer zero) → integers q, scale, float zero (w = s·q + z')."""
    d_out, d_in = q_fake.shape
    groups = d_in // group_size
    if scale.shape[1] == d_in:  # some versions expand scale/zero per column
        scale, zero = scale[:, ::group_size], zero[:, ::group_size]
    scale, zero = scale.float().reshape(d_out, groups), zero.float().reshape(d_out, groups)
    g = q_fake.float().reshape(d_out, groups, group_size)
    q = torch.round(g / scale[..., None] + zero[..., None]).clamp(0, 2**bits - 1)
    return q.reshape(d_out, d_in).to(torch.uint8), scale, -scale * zero


# gptqmodel sizes its CPU pool from GPTQMODEL_CPU_WORKERS when it first quantizes (its default: half the cores);
# ours is every core, for this quantization only: the process's environment is put back afterwards
@environment_kept(("GPTQMODEL_CPU_WORKERS",))
@torch.no_grad()
def gptq_quantize(
    model: torch.nn.Module,
    targets: list[tuple[str, torch.nn.Linear]],
    calibration: Iterable[dict[str, torch.Tensor]],
    bits: int,
    group_size: int,
    param_dtype: torch.dtype,
    compute_dtype: torch.dtype,
    damp_percent: float = 0.01,
) -> dict[str, QuantLinear]:
    """Quantize ``targets`` of ``model`` with GPTQ on ``calibration`` batches (model inputs); returns a
    QuantLinear per path. The model is modified along the way (each block is replaced as it is quantized),
    so later blocks see quantized earlier ones; the caller swaps in the returned layers (or its adapters)."""
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(min(2, os.cpu_count() or 1)))
    GPTQ, QuantizeConfig = _import_gptq()
    qcfg = QuantizeConfig(bits=bits, group_size=group_size, sym=False, desc_act=False, damp_percent=damp_percent)
    device = next(model.parameters()).device
    batches = [{k: v.to(device) for k, v in b.items()} for b in calibration]
    was_training = model.training
    model.eval()
    done: dict[str, QuantLinear] = {}
    for block in _blocks(targets):
        gptqs = {path: GPTQ(lin, qcfg) for path, lin in block}
        for g in gptqs.values():
            g.quantizer.configure(perchannel=True, bits=bits, sym=False)  # as gptqmodel's own processor does
        seen: set[str] = set()

        def record(path, gptqs=gptqs, seen=seen):
            def hook(mod, args, out):
                gptqs[path].add_batch(args[0].detach().float(), out.detach().float())
                seen.add(path)
                if len(seen) == len(gptqs):
                    raise _StopForward  # the rest of the model is not needed for this block

            return hook

        handles = [lin.register_forward_hook(record(path)) for path, lin in block]
        try:
            for batch in batches:
                seen.clear()
                try:
                    model(**batch)
                except _StopForward:
                    pass
        finally:
            for h in handles:
                h.remove()
        for path, lin in block:
            q_fake, scale, zero = gptqs[path].quantize()[:3]
            ql = QuantLinear(lin.in_features, lin.out_features, bits, group_size, lin.bias is not None,
                             param_dtype, compute_dtype)  # fmt: skip
            ql.set_quantized(*_to_ftbench(q_fake, scale, zero, bits, group_size))
            if lin.bias is not None:
                ql.bias.data = lin.bias.detach().float().clone()
            done[path] = ql
            gptqs[path].free()
            parent, _, name = path.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, name, ql)
    model.train(was_training)
    return done
