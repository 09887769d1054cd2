"""Model FLOPs per training step, and the machine's peak matmul rate to compare them with (MFU).

Counting (the matmuls of linear layers and of self-attention, as PaLM's MFU does, Chowdhery et al. 2022, appendix
B; norms and activations are left out, embeddings are lookups, not matmuls):

  * forward: 2·n FLOPs per token for a layer with n = d_in·d_out weights;
  * backward, input gradient: 2·n per token — needed only if something trainable lies *before* the layer;
  * backward, weight gradient: 2·n per token — only if the layer's weight trains;
  * attention: each (query, key) pair of a row costs 4·d per layer forward (scores QKᵀ and the weighted sum of
    V, d = heads × head dim), every pair of the padded row counted (a causal mask's too, as PaLM's 12·L·H·Q·T),
    and twice that backward where gradients pass through it (the share of the body that needs input gradients).

Full fine-tuning therefore costs ≈ 6·N per token plus 12·L·d·T for attention over T positions; a frozen base
under adapters costs 4·N (forward + input-gradient backward, no weight gradients) plus 6·n for each adapter
matrix; a frozen base below the only trainable part (a head) costs 2·N and attention's forward alone. Tokens are
*computed* tokens (batch × padded length): padding costs work. MFU = model FLOPs per second / the peak matmul
rate measured on this machine in the run's dtype. (Until 2026-12-07 attention was left out, as in the 6·N·T
rule: for full fine-tuning of MiniLM-L6 it is 5% of the model FLOPs at 128 tokens, 14% at 384.)
"""

from __future__ import annotations

import json
from pathlib import Path

import torch


def _weight_shape(mod: torch.nn.Module) -> tuple[int, int] | None:
    """(d_in, d_out) of a linear-like module: nn.Linear, bitsandbytes Linear4bit, QA-LoRA QuantLinear. Adapter
    wrappers (peft's layers hold the original as ``base_layer``; its 4-bit one is also named Linear4bit) are not
    matmuls themselves: their base layer and adapter matrices are counted where they are."""
    if hasattr(mod, "base_layer"):
        return None
    if isinstance(mod, torch.nn.Linear) or callable(getattr(mod, "quantized_numel", None)):
        return mod.in_features, mod.out_features
    if type(mod).__name__ in ("Linear4bit", "Linear8bitLt"):
        return mod.in_features, mod.out_features
    return None


def flops_per_token(
    model: torch.nn.Module, output_names: frozenset[str] = frozenset(), inputs_train: bool = False
) -> dict[str, float]:
    """Per-token matmul FLOPs of a training step. Modules named in ``output_names`` (a decoder's LM head,
    which prompts run on a few positions per row only) are counted apart, per position: ``output_per_position``.
    Whether a layer passes gradients back follows the modules' order, or every layer does with ``inputs_train``
    (``Method.trains_inputs``: trainable parameters registered after the layers they feed)."""
    fwd = bwd_in = bwd_w = out = 0.0
    trainable_seen = inputs_train
    for name, mod in model.named_modules():
        own = list(mod.parameters(recurse=False))
        shape = _weight_shape(mod)
        if shape is not None:
            n = shape[0] * shape[1]
            weight = getattr(mod, "weight", None)
            trains = isinstance(weight, torch.nn.Parameter) and weight.requires_grad
            cost = (2 * n, 2 * n if trainable_seen else 0, 2 * n if trains else 0)
            if name.split(".")[-1] in output_names:
                out += sum(cost)
            else:
                fwd, bwd_in, bwd_w = fwd + cost[0], bwd_in + cost[1], bwd_w + cost[2]
        if any(p.requires_grad for p in own):
            trainable_seen = True
    layers, width = attention_dims(model)
    through = bwd_in / fwd if fwd else 0.0  # the share of the body that gradients pass through, attention too
    return {
        "forward": fwd,
        "backward_input": bwd_in,
        "backward_weight": bwd_w,
        "total": fwd + bwd_in + bwd_w,
        "output_per_position": out,
        "attention_forward_per_pair": 4.0 * layers * width,
        "attention_per_pair": 4.0 * layers * width * (1 + 2 * through),
    }


def batch_work(input_ids: torch.Tensor) -> tuple[int, int]:
    """What a batch padded to its longest row costs: (computed tokens, attention's (query, key) pairs) =
    (rows × width, rows × width²). THE loop records both per step; the dry run prices a step from them."""
    rows, width = input_ids.shape[0], input_ids.shape[1]
    return rows * width, rows * width * width


def attention_dims(model: torch.nn.Module) -> tuple[int, int]:
    """(layers, query width = heads × head dim) of the model's self-attention, from its config (transformers'
    names; a peft wrapper passes its base model's on); (0, 0) where the config does not say: attention uncounted."""
    cfg = getattr(model, "config", None)
    layers, heads = getattr(cfg, "num_hidden_layers", None), getattr(cfg, "num_attention_heads", None)
    if not isinstance(layers, int) or not isinstance(heads, int) or heads < 1:
        return 0, 0
    head_dim = getattr(cfg, "head_dim", None)
    if not isinstance(head_dim, int):
        hidden = getattr(cfg, "hidden_size", None)
        head_dim = hidden // heads if isinstance(hidden, int) else 0
    return layers, heads * head_dim


def mfu_dtype(train_dtype: str, method_compute: str | None, device: torch.device | None = None) -> str:
    """The dtype whose peak MFU is measured against: the one the run's matmuls run in, i.e. the method's compute
    dtype where it declares one (``Method.compute_dtype``, e.g. QLoRA dequantizing to bf16 under fp32 training),
    else the training dtype (both resolved), unless ``device`` emulates it: then float32's. An emulated half dtype
    (fp16 on most CPUs, bf16 on AVX2) runs on the fp32 units, so its own "peak" is the emulation's speed, not the
    machine's: MiniLM-L6 under fp16 autocast ran at 1.9× the fp16 matmul probe on a Zen 4 EPYC (MFU 189%)."""
    from harness.measure.hardware import HALF, is_emulated

    dtype = method_compute if method_compute in ("float32", *HALF) and train_dtype == "float32" else train_dtype
    return "float32" if device is not None and dtype in HALF and is_emulated(dtype, device) else dtype


def training_flops(
    model: torch.nn.Module,
    output_names: list[str],
    res,
    dtype_name: str,
    results_dir: Path,
    device: torch.device,
    positions_added: int = 0,
    recomputed: bool = False,
    inputs_train: bool = False,
) -> dict:
    """The record's FLOPs and MFU fields for a finished loop (``res``: a :class:`harness.cell.loop.LoopResult`).
    Every layer runs on every computed token, and on the ``positions_added`` a method puts before each sequence
    (``Method.positions_added``: prompt tuning's virtual tokens); the output head on the positions it computed
    (prompts: the answer's), per optimizer step; MFU = model FLOPs per measured second / the suite's peak in
    ``dtype_name``. Model FLOPs leave out what gradient checkpointing recomputes (PaLM's MFU, Chowdhery et al.
    2022, appendix B): with ``recomputed``, HFU adds one more forward of the body per token, the work the
    hardware did; without it HFU equals MFU. ``inputs_train``: see :func:`flops_per_token`."""
    timed, measured = res.timed_steps, res.measured_step_times_s
    fpt = flops_per_token(model, frozenset(output_names), inputs_train)
    if not measured:
        return {"flops_per_token": fpt}
    p = positions_added
    tokens = [res.computed_tokens_per_step[i] + p * res.samples_per_step[i] for i in timed]
    # each row's (query, key) pairs at its padded length w + p: Σ rows·w² + 2p·Σ rows·w + p²·rows
    pairs = [
        res.attention_pairs_per_step[i] + 2 * p * res.computed_tokens_per_step[i] + p * p * res.samples_per_step[i]
        if i < len(res.attention_pairs_per_step)
        else 0
        for i in timed
    ]
    step_flops = [
        fpt["total"] * t + fpt["attention_per_pair"] * a + fpt["output_per_position"] * res.head_positions_per_step[i]
        for t, a, i in zip(tokens, pairs, timed, strict=True)
    ]
    again = [fpt["forward"] * t + fpt["attention_forward_per_pair"] * a for t, a in zip(tokens, pairs, strict=True)]
    hardware = [f + (r if recomputed else 0.0) for f, r in zip(step_flops, again, strict=True)]
    peak = peak_flops(results_dir, dtype_name, device)
    return {
        "flops_per_token": fpt,
        "model_flops_per_step": sum(step_flops) / len(step_flops),
        "peak_matmul_flops": peak["peak_matmul_flops"],
        "peak_matmul_info": {k: v for k, v in peak.items() if k != "peak_matmul_flops"},
        "mfu_dtype": dtype_name,
        "mfu": sum(step_flops) / sum(measured) / peak["peak_matmul_flops"],
        "hfu": sum(hardware) / sum(measured) / peak["peak_matmul_flops"],
    }


def peak_flops(results_dir: Path | None, dtype_name: str, device: torch.device) -> dict:
    """The suite's peak for ``dtype_name``: one denominator per suite. The first figure a suite uses is kept in
    ``results_dir/machine.json`` (kept on resume too) and comes from the per-machine cache (measured there when
    missing: bounded and load-checked, see :mod:`harness.measure.hardware`). A host other than the one that figure came
    from (a Ray worker elsewhere, a resume on another machine) uses its own machine's figure, and says so."""
    import fcntl

    from harness.measure.hardware import peak_matmul, static_identity

    here = static_identity(device)["machine_key"]
    key = f"{device.type}:{dtype_name}"
    if results_dir is None:
        return {**peak_matmul(dtype_name, device), "source": "machine cache"}
    path = Path(results_dir) / "machine.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / ".machine.json.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            suite = json.loads(path.read_text()) if path.exists() else {}
        except ValueError:
            suite = {}
        entry = suite.get(key)
        if entry is not None and entry.get("machine_key") == here:
            return {**entry, "source": "suite (machine.json)"}
        own = peak_matmul(dtype_name, device)
        if entry is not None:  # another machine set the suite's figure: MFU here is against this host's own
            return {**own, "source": "this host's own peak (the suite's figure is from another machine)"}
        suite[key] = own
        from harness.atomic import atomic_write_text

        atomic_write_text(path, json.dumps(suite, indent=1))
        return {**own, "source": "suite (machine.json)"}
