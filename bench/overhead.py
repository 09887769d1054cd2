"""Harness overhead: ftbench's training loop vs a bare PyTorch + peft loop, same model, same batch.

Both loops train their own copy of MiniLM-L6 with LoRA (r=8, query/value) on one fixed batch of Rotten
Tomatoes snippets. They alternate in blocks within one process (ABBA order, so slow drift of the machine
hits both equally), each block timed from outside with ``perf_counter``. The harness block is a whole call
of ``harness.cell.loop.train`` — optimizer and scheduler construction included — so any per-step or per-call
cost of the harness shows up. Goal: median ratio harness / bare ≤ 1.03.

    python bench/overhead.py [--rounds 8] [--steps 10] [--batch 16] [--seq 64] [--dtype float32]
"""

from __future__ import annotations

import argparse
import copy
import itertools
import statistics
import time

import torch

from harness.cell.loop import DTYPES, train
from harness.cell.models import load_model
from harness.contract import ModelContext
from harness.registry import get_method
from harness.schema import TrainConfig
from harness.tasks.builtin import TaskSpec, load_task
from harness.tasks.classifier import collate, encode


def bare_block(model, opt, sched, batch, steps, dtype):
    """What a hand-written loop does: forward, backward, clip, step, schedule, zero, log the loss."""
    model.train()
    for _ in range(steps):
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        loss.item()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10, help="steps per timed block")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--dtype", default="float32", choices=list(DTYPES))
    args = ap.parse_args()

    loaded = load_model("minilm-l6", 2, seed=0)
    task = load_task(TaskSpec(name="rotten_tomatoes", train_examples=args.batch))
    batch = collate(encode(task.train, loaded.tokenizer, args.seq), loaded.tokenizer.pad_token_id)
    lora = get_method("lora")
    method = lora(lora.Config(r=8, target_modules=["query", "value"]))
    ctx = ModelContext("seq_cls", 2, "bert", ["classifier"])
    base = loaded.model
    h_model = method.prepare(copy.deepcopy(base), ctx)
    b_model = method.prepare(copy.deepcopy(base), ctx)
    cfg = TrainConfig(
        steps=args.steps,
        batch_size=args.batch,
        lr=1e-4,
        max_seq_len=args.seq,
        dtype=args.dtype,
        timing_warmup_steps=0,
        schedule="constant",
    )
    dtype = DTYPES[args.dtype]
    b_params = [p for p in b_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(b_params, lr=1e-4, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)

    def harness_block():
        train(h_model, method, itertools.repeat(batch), cfg, seed=0, device=torch.device("cpu"))

    def bare():
        bare_block(b_model, opt, sched, batch, args.steps, dtype)

    harness_block(), bare()  # warm-up: allocator, lazy init, optimizer state
    times: dict[str, list[float]] = {"harness": [], "bare": []}
    for r in range(args.rounds):
        order = [("harness", harness_block), ("bare", bare)]
        for name, fn in order if r % 2 == 0 else order[::-1]:
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) / args.steps)
    h, b = statistics.median(times["harness"]), statistics.median(times["bare"])
    ratios = [x / y for x, y in zip(times["harness"], times["bare"], strict=True)]
    print(
        f"model minilm-l6 + LoRA r=8 (query,value), batch {args.batch}, seq {batch['input_ids'].shape[1]}, "
        f"{args.dtype}, {torch.get_num_threads()} threads; {args.rounds} rounds × {args.steps} steps, ABBA order"
    )
    print(f"bare PyTorch+peft step: median {b * 1000:.1f} ms")
    print(f"ftbench harness step:   median {h * 1000:.1f} ms")
    print(f"ratio harness/bare: {h / b:.3f} (median of per-round ratios {statistics.median(ratios):.3f}; goal ≤ 1.03)")


if __name__ == "__main__":
    main()
