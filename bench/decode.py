"""Decode latency at batch 1 on SmolLM2-135M: QA-LoRA's merged INT4 model through torch's CPU INT4 kernel vs
the merged LoRA model in bf16 (and fp32). Goal (issue 15): INT4 per token ≤ 0.4× bf16's.

A merged LoRA model is a dense model of the base's shape, and a merged QA-LoRA model is the base with its
targeted linears as group-wise INT4 (the merge changes only zero points), so their latency does not depend on
training: the base stands in for both, which keeps this benchmark to a minute. Each figure is
``harness.cell.deploy.decoder_latency`` (64-token prompt, 32 tokens decoded greedily with the KV cache, one warm-up,
``--repeats`` timed generations). It also times what the INT4 model still runs in float: the LM head
(576 × 49,152, tied to the embeddings; QA-LoRA quantizes the decoder layers' linears only) at M = 1, to say what
limits the ratio.

    python bench/decode.py [--repeats 3] [--threads N]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch

from harness.cell.deploy import decoder_latency
from harness.cell.models import load_model
from harness.environment import describe
from harness.measure.hardware import identity
from methods.intquant import QuantLinear, set_module


def int4(model: torch.nn.Module, group_size: int, head_bf16: bool = False) -> torch.nn.Module:
    """The decoder layers' linears as INT4 (RTN, fp16 scales and zeros) on the INT4 kernel, as QA-LoRA exports."""
    m = copy.deepcopy(model)
    for name, lin in list(m.named_modules()):
        if isinstance(lin, torch.nn.Linear) and ".layers." in name:
            q = QuantLinear.from_linear(lin, 4, group_size, torch.float16, torch.float32)
            q.kernel = "int4"
            q.int4_packed()
            set_module(m, name, q)
    if head_bf16:  # a deployment choice beyond QA-LoRA's export: the tied head in bf16 (untied from the input)
        m.lm_head = copy.deepcopy(m.lm_head).to(torch.bfloat16)
        m.lm_head.register_forward_pre_hook(lambda mod, args: (args[0].to(torch.bfloat16),))
        m.lm_head.register_forward_hook(lambda mod, args, out: out.float())
    return m.eval()


class Free(torch.nn.Module):
    """A linear layer that costs nothing: zeros of the right shape (what is left is everything else)."""

    def __init__(self, out_features: int) -> None:
        super().__init__()
        self.out_features = out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(*x.shape[:-1], self.out_features)


def free_linears(model: torch.nn.Module) -> torch.nn.Module:
    m = copy.deepcopy(model)
    for name, lin in list(m.named_modules()):
        if isinstance(lin, torch.nn.Linear) and ".layers." in name:
            set_module(m, name, Free(lin.out_features))
    return m.eval()


def head_time_s(model: torch.nn.Module, dtype: torch.dtype, n: int = 50) -> float:
    w = model.lm_head.weight.detach().to(dtype)
    x = torch.randn(1, w.shape[1], dtype=dtype)
    with torch.no_grad():
        torch.nn.functional.linear(x, w)
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            torch.nn.functional.linear(x, w)
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default="results/bench/decode.json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cpu = torch.device("cpu")
    print(f"hardware: {describe(identity(cpu))} · {torch.get_num_threads()} threads")
    base = load_model("smollm2-135m", 2, 0, mode="prompt").model.float().eval()
    variants = {
        "LoRA merged, fp32": lambda: base,
        "LoRA merged, bf16": lambda: copy.deepcopy(base).to(torch.bfloat16),
        "QA-LoRA merged INT4 g32, kernel": lambda: int4(base, 32),
        "QA-LoRA merged INT4 g64, kernel": lambda: int4(base, 64),
        "QA-LoRA merged INT4 g32, kernel + bf16 head": lambda: int4(base, 32, head_bf16=True),
        "floor: every decoder linear free (zeros)": lambda: free_linears(base),
    }
    rows = {}
    for name, build in variants.items():
        model = build()
        lat = decoder_latency(model, cpu, 64, 32, args.repeats)
        tok, pre = lat["decode_per_token"], lat["prefill"]
        rows[name] = {"per_token": tok, "prefill": pre}
        print(
            f"{name:46s} {tok['median_s'] * 1e3:7.2f} ms/token (IQR {tok['q1_s'] * 1e3:.2f}–{tok['q3_s'] * 1e3:.2f})"
            f"   prefill {pre['median_s'] * 1e3:7.1f} ms"
        )
        del model
    bf16 = rows["LoRA merged, bf16"]["per_token"]["median_s"]
    for name in [n for n in rows if n.startswith(("QA-LoRA", "floor"))]:
        print(f"ratio {name} / bf16: {rows[name]['per_token']['median_s'] / bf16:.2f} (goal ≤ 0.40)")
    head = {str(d).removeprefix("torch."): head_time_s(base, d) for d in (torch.float32, torch.bfloat16)}
    g32 = rows["QA-LoRA merged INT4 g32, kernel"]["per_token"]["median_s"]
    print(
        f"LM head alone at M=1: fp32 {head['float32'] * 1e3:.2f} ms, bf16 {head['bfloat16'] * 1e3:.2f} ms "
        f"({head['float32'] / g32:.0%} of the INT4 g32 model's token)"
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    hw = describe(identity(cpu))
    out.write_text(json.dumps({"hardware": hw, "threads": torch.get_num_threads(), "rows": rows, "head_s": head}))
    print(f"written: {out}")


if __name__ == "__main__":
    main()
