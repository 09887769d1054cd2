"""What a run's final artifacts cost to deploy: load time from disk, and latency at batch 1.

For every deployable form an export names (:class:`harness.contract.Deployable`: e.g. LoRA merged in fp32 and
in bf16, QA-LoRA merged INT4 through torch's CPU INT4 kernel), the runner loads it (timed, from disk where the
form has a loader), evaluates it on the test split, and measures:

* decoders: the prefill of a ``prompt_tokens`` prompt at batch 1, then ``new_tokens`` greedily decoded one at
  a time with the KV cache on (the usual chat/completion path), each token timed on its own;
* encoders: a forward at batch 1 and at batch 32 of ``max_seq_len`` tokens, per example.

Each figure keeps its raw repeats (``*_times_s``) and their median and quartiles; the first call of each kind
is a warm-up, never counted (one-time costs: the INT4 kernel's weight repacking, allocator growth). Inputs are
seeded token ids drawn from the model's vocabulary, so latency never depends on what text happened to be first.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from harness.cell.models import probe_ids
from harness.measure.runstats import sync
from harness.tasks.decoding import decodes_on_own_cache


def _quartiles(xs: list[float]) -> dict[str, float]:
    if len(xs) == 1:
        return {"median_s": xs[0], "q1_s": xs[0], "q3_s": xs[0]}
    q1, med, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    return {"median_s": med, "q1_s": q1, "q3_s": q3}


def _timed(device, model: torch.nn.Module, **inputs):
    """(seconds, output) of one forward."""
    sync(device)
    t0 = time.perf_counter()
    out = model(**inputs)
    sync(device)
    return time.perf_counter() - t0, out


@torch.no_grad()
def decoder_latency(
    model: torch.nn.Module, device, prompt_tokens: int = 64, new_tokens: int = 32, repeats: int = 3, seed: int = 0
) -> dict[str, Any]:
    """Prefill and per-token greedy decode at batch 1 with the KV cache (a warm-up generation first). A model
    that decodes on its own cache (PEFT's prompt learning: harness/tasks/decoding.py) is timed as ftbench scores
    it: the prompt through its forward (the virtual tokens or prefix go in there), each new token through its
    base on that cache."""
    prompt = probe_ids(model, (1, prompt_tokens), seed, device, eos=False)
    step = model.get_base_model() if decodes_on_own_cache(model) and hasattr(model, "get_base_model") else model

    def generate() -> tuple[float, list[float]]:
        prefill, out = _timed(device, model, input_ids=prompt, attention_mask=torch.ones_like(prompt), use_cache=True)
        # transformers 5.2x names the KV cache `cache` (`past_key_values` before, now deprecated)
        kw = "cache" if getattr(out, "cache", None) is not None else "past_key_values"
        mask = prompt.new_ones(1, getattr(out, kw).get_seq_length())  # the virtual tokens' too, where there are
        times = []
        for _ in range(new_tokens):
            nxt = out.logits[:, -1:].argmax(-1)
            mask = torch.cat([mask, mask.new_ones(1, 1)], 1)
            t, out = _timed(device, step, input_ids=nxt, attention_mask=mask, use_cache=True, **{kw: getattr(out, kw)})
            times.append(t)
        return prefill, times

    generate()  # warm-up
    token_times, prefill_times = [], []
    for _ in range(repeats):
        p, ts = generate()
        prefill_times.append(p)
        token_times += ts
    return {
        "kind": "decoder",
        "prompt_tokens": prompt_tokens,
        "new_tokens": new_tokens,
        "repeats": repeats,
        "prefill": {**_quartiles(prefill_times), "times_s": prefill_times},
        "decode_per_token": {**_quartiles(token_times), "times_s": token_times},
    }


@torch.no_grad()
def encoder_latency(
    model: torch.nn.Module, device, seq_len: int, batches: tuple[int, ...] = (1, 32), repeats: int = 5, seed: int = 0
) -> dict[str, Any]:
    """Per-example forward time at each batch size (a warm-up forward first, per batch size)."""
    out: dict[str, Any] = {"kind": "encoder", "seq_len": seq_len, "repeats": repeats}
    for b in batches:
        ids = probe_ids(model, (b, seq_len), seed, device)
        mask = torch.ones_like(ids)
        model(input_ids=ids, attention_mask=mask)  # warm-up
        times = [_timed(device, model, input_ids=ids, attention_mask=mask)[0] / b for _ in range(repeats)]
        out[f"batch_{b}_per_example"] = {**_quartiles(times), "times_s": times}
    return out


def latency(model: torch.nn.Module, causal: bool, device, seq_len: int, cfg) -> dict[str, Any]:
    """The latency block for a deployable model: decoder or encoder, per the run's task IO."""
    model.eval()
    if causal:
        return decoder_latency(model, device, cfg.prompt_tokens, cfg.new_tokens, cfg.repeats)
    return encoder_latency(model, device, seq_len, (1, 32), max(cfg.repeats, 3))


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    """Same class, same tensors (names, dtypes, values): the same scores on the same inputs."""
    if type(a) is not type(b):
        return False
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(
        sa[k].dtype == sb[k].dtype and sa[k].shape == sb[k].shape and torch.equal(sa[k], sb[k]) for k in sa
    )


def measure(export, evaluate, causal: bool, seq_len: int, cfg, device, say, known: dict) -> list:
    """Every deployable form of ``export``: load (timed), evaluate on the test split, time at batch 1. A form in
    a dtype this machine emulates (bf16 on an AVX2-only CPU: 100× slower) is skipped, saying so, rather than
    timed: its figure would measure the emulation. ``known``: id → (model, its float32 test metrics): a float32
    form whose weights equal one of them bit for bit scores what it scored, so it is not evaluated again. A form
    in another dtype is always evaluated: the same weights through another kernel (QA-LoRA's INT4 matmul with
    bf16 activations) score differently."""
    import gc

    from harness.measure.hardware import is_emulated, slow_note
    from harness.records import DeploymentRecord, EvalMetrics

    out = []
    for d in export.deploy:
        rec = DeploymentRecord(name=d.name, dtype=d.dtype, note=d.note)
        if d.skipped:
            rec.skipped = d.skipped
            out.append(rec)
            continue
        if d.dtype in ("float16", "bfloat16") and is_emulated(d.dtype, device):
            note = slow_note(d.dtype, device)
            rec.skipped = f"{note}: its latency would measure the emulation; measure it where {d.dtype} is native"
            out.append(rec)
            continue
        say(f"deployment cost: {export.kind} · {d.name}")
        try:
            if d.load is not None:
                t0 = time.perf_counter()
                model = d.load()
                model = model.to(device).eval()
                sync(device)
                rec.load_time_s = time.perf_counter() - t0
            else:
                model = d.model.eval()
            reusable = known.values() if d.dtype == "float32" else ()
            metrics = next((m for ref, m in reusable if _same_weights(model, ref)), None)
            rec.eval = EvalMetrics(**(metrics if metrics is not None else evaluate(model)[0]))
            rec.latency = latency(model, causal, device, seq_len, cfg)
        except Exception as err:  # one form failing (a kernel missing on this build) leaves the others standing
            rec.error = f"{type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}"
        out.append(rec)
        model = None
        gc.collect()
    return out
