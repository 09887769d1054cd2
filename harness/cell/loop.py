"""THE training loop: one loop for every method, no method-specific branches.

Read it top to bottom: seed, optimizer over the parameters the method names (in the method's parameter
groups, by the method's own optimizer where it has one), LR schedule, then for each optimizer step
``grad_accum`` micro-batches of forward/backward (the task's loss plus the method's loss term), clipping, the
optimizer and scheduler steps, and the method's ``on_step_end`` hook (under fp16, a step whose gradients
overflowed makes none of the three, and the loss scale halves). The first ``timing_warmup_steps`` steps
are real training steps but are excluded from the step-time statistics (allocator growth, lazy initialisation
and the first optimizer-state allocation make them slow). Memory is tracked during those steps and during any
later step whose batch is larger (batch × padded length) than every step tracked so far, so the peak covers the
largest batches of the whole run; a tracked step is never a timed one (the tracker's bookkeeping costs time).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from harness.cell.optim import build_optimizer, implementation, lr_lambda, optimizer_state_bytes, paged_state_in_use
from harness.measure.flops import batch_work
from harness.measure.hardware import DTYPES
from harness.measure.memory import MemoryTracker, NullTracker, step_roots
from harness.measure.runstats import cuda_memory_peaks, cuda_memory_reset, step_time_stats, sync
from harness.records import TrainingRecord, timed_steps
from harness.registry import Method
from harness.schema import TrainConfig


class NonFiniteLoss(RuntimeError):
    """Training produced a NaN/inf loss; the run stops at once rather than report numbers from garbage.
    ``result`` holds what was measured up to that step."""

    def __init__(self, message: str, result: LoopResult) -> None:
        super().__init__(message)
        self.result = result


@dataclass
class LoopResult:
    """What THE loop measured: per-step losses, learning rates, gradient norms and times, memory, throughput."""

    losses: list[float] = field(default_factory=list)  # per optimizer step, mean over micro-batches
    lrs: list[float] = field(default_factory=list)
    grad_norms: list[float] = field(default_factory=list)
    step_times_s: list[float] = field(default_factory=list)  # every step, warm-up included (see measured)
    tokens_per_step: list[int] = field(default_factory=list)  # non-pad tokens
    computed_tokens_per_step: list[int] = field(default_factory=list)  # batch × padded length (what costs FLOPs)
    samples_per_step: list[int] = field(default_factory=list)
    head_positions_per_step: list[int] = field(default_factory=list)  # positions the output head ran on (FLOPs)
    attention_pairs_per_step: list[int] = field(default_factory=list)  # Σ rows × padded length²: (query, key) pairs
    optimizer: str = ""  # the optimizer that ran: the suite's by name, or the method's own by class
    optimizer_implementation: str = ""  # fused | foreach | for-loop, or the library's name
    optimizer_groups: list[dict] = field(default_factory=list)  # name, parameters, elements and options of each group
    timing_warmup_steps: int = 0
    memory_tracked_steps: list[int] = field(default_factory=list)  # warm-up, step 1, each new largest batch; not timed
    peak_live_tensor_bytes: int | None = None  # from the tensors themselves, over the tracked steps
    memory_at_peak_bytes: dict = field(default_factory=dict)  # category -> bytes at that peak
    memory_category_max_bytes: dict = field(default_factory=dict)  # category -> its own maximum
    optimizer_state_bytes: int = 0
    paging_effective: bool | None = None  # None: no paged optimizer asked for
    loss_scales: list[float] = field(default_factory=list)  # fp16: the scale each step's backward ran with
    skipped_steps: list[int] = field(default_factory=list)  # fp16: steps whose gradients overflowed (no update)
    cuda: dict = field(default_factory=dict)

    @property
    def timed_steps(self) -> list[int]:
        return timed_steps(len(self.step_times_s), self.timing_warmup_steps, self.memory_tracked_steps)

    @property
    def measured_step_times_s(self) -> list[float]:
        return [self.step_times_s[i] for i in self.timed_steps]

    def record(self, train_time_s: float | None = None, nvml_bytes: int | None = None) -> TrainingRecord:
        """What the run's record keeps of this loop: the raw per-step values, the throughput over measured steps
        (non-pad tokens and examples over their time), the training step's memory. Also for a run stopped by a
        non-finite loss: its curve up to the bad step."""
        measured, timed = self.measured_step_times_s, self.timed_steps
        same = {f: getattr(self, f) for f in TrainingRecord.model_fields if hasattr(self, f)}  # named alike
        return TrainingRecord(
            **{**same, **self.cuda, "optimizer": self.optimizer or None},  # cuda: the allocator's peaks, on a GPU
            step_time_stats=step_time_stats(measured),
            final_loss=self.losses[-1] if self.losses else None,
            tokens_per_s=sum(self.tokens_per_step[i] for i in timed) / sum(measured) if measured else None,
            samples_per_s=sum(self.samples_per_step[i] for i in timed) / sum(measured) if measured else None,
            train_time_s=train_time_s,
            nvml_process_bytes=nvml_bytes,
        )


def set_seed(seed: int) -> None:
    """Seed Python's, NumPy's and torch's generators: the same seed, the same run."""
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """Non-reentrant checkpointing needs no input gradients, so it works the same for frozen bases."""
    target = model
    while not hasattr(target, "gradient_checkpointing_enable") and hasattr(target, "base_model"):
        target = target.base_model
    if not hasattr(target, "gradient_checkpointing_enable"):
        raise ValueError(f"{type(model).__name__} does not support gradient checkpointing")
    target.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def train(
    model: torch.nn.Module,
    method: Method,
    batches: Iterator[dict[str, torch.Tensor]],
    cfg: TrainConfig,
    seed: int,
    device: torch.device,
    objective: Callable[[torch.nn.Module, dict], torch.Tensor] | None = None,
    on_step: Callable[[int, int, float], None] | None = None,
) -> LoopResult:
    """Train ``model`` for ``cfg.steps`` optimizer steps. ``objective(model, batch)`` is the task's loss (the
    task's, not the method's: e.g. next-token NLL of the answer for prompts); default: the model's own loss.
    ``batches`` yields dicts of tensors (a :class:`harness.contract.Batch` also says how many positions the output
    head computes on). ``on_step(steps_done, steps_total, step_time_s)`` is told after each step, outside the
    timed region (the runner shows it as the cell's progress)."""
    objective = objective or (lambda m, batch: m(**batch).loss)
    set_seed(seed)
    named = method.trainable_parameters(model)
    params = [p for _, p in named]
    if not params:
        raise ValueError(f"method {method.name!r} left no trainable parameters")
    groups = method.param_groups(named, cfg.lr)
    grouped = [p for g in groups for p in g["params"]]
    if len(grouped) != len(params) or {id(p) for p in grouped} != {id(p) for p in params}:
        raise ValueError(f"method {method.name!r}: param_groups must hold each trainable parameter exactly once")
    own = method.optimizer(groups, cfg.lr, cfg.weight_decay)  # None: the suite's train.optimizer
    optimizer = own or build_optimizer(cfg.optimizer, groups, cfg.lr, cfg.weight_decay, cfg.optimizer_args)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.schedule, cfg.warmup_steps, cfg.steps))
    if cfg.grad_checkpointing:
        enable_gradient_checkpointing(model)
    dtype = DTYPES[cfg.dtype]
    # Mixed precision: weights and optimizer stay float32, matmuls run in bf16/fp16 where autocast allows.
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    # fp16's narrow range flushes small gradients to zero: the loss is scaled up before backward and the gradients
    # scaled back before clipping; a step whose gradients overflowed is skipped and the scale halved (Micikevicius
    # et al. 2018, "Mixed Precision Training", arXiv 1710.03740, section 3.2). bf16 has fp32's range: no scaling.
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None

    name = cfg.optimizer if own is None else f"{type(own).__name__} (the method's own)"
    res = LoopResult(timing_warmup_steps=min(cfg.timing_warmup_steps, cfg.steps), optimizer=name)
    res.optimizer_implementation = implementation(optimizer)
    res.optimizer_groups = [  # what each group trained with: the method's own options, the learning rate
        {
            "name": g.get("name", str(i)),
            "tensors": len(g["params"]),
            "elements": sum(p.numel() for p in g["params"]),
            **{k: v for k, v in g.items() if k not in ("params", "name")},
            "lr": og.get("initial_lr", og["lr"]),
        }
        for i, (g, og) in enumerate(zip(groups, optimizer.param_groups, strict=False))
    ]
    model.train()
    cuda_memory_reset(device)
    largest_tracked = 0
    for step in range(cfg.steps):
        drawn = [next(batches) for _ in range(cfg.grad_accum)]
        micro = [{k: v.to(device) for k, v in b.items()} for b in drawn]
        # Memory is tracked (by category) in the warm-up steps and in any step with a larger batch than every
        # tracked one: the peak then covers the run's largest batches, and no timed step pays for tracking. Step 1
        # too, where a later step is left to time: it is the first whose forward and backward run beside the
        # optimizer's state (made by step 0's update), which sets full fine-tuning's peak at long sequences.
        work = [batch_work(b["input_ids"]) for b in micro]  # (batch × padded length, attention pairs): FLOPs
        size = sum(tokens for tokens, _ in work)
        tracking = step < res.timing_warmup_steps or size > largest_tracked or (step == 1 and cfg.steps > 2)
        if tracking:
            largest_tracked = max(largest_tracked, size)
            res.memory_tracked_steps.append(step)
        tracker = MemoryTracker(step_roots(model, optimizer, micro), device.type) if tracking else NullTracker()
        sync(device)
        t0 = time.perf_counter()
        with tracker:
            loss_sum = 0.0
            for batch in micro:
                with autocast, tracker.forward():
                    loss = objective(model, batch)
                    extra = method.loss_term(model, batch)  # a regulariser, say; None for most methods
                    loss = (loss if extra is None else loss + extra) / cfg.grad_accum
                (loss if scaler is None else scaler.scale(loss)).backward()
                loss_sum += float(loss.detach())
            if not math.isfinite(loss_sum):
                res.losses.append(loss_sum)
                hint = " (fp16 ends at ±65504: bfloat16 or float32 would tell an overflow apart)" if scaler else ""
                raise NonFiniteLoss(f"non-finite loss {loss_sum} at step {step}{hint}", res)
            tracker.gradients_ready(params)
            if scaler is not None:
                scale = scaler.get_scale()
                res.loss_scales.append(scale)
                scaler.unscale_(optimizer)  # clipping and the method's hook see the true gradients
            norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm or math.inf)
            lr = optimizer.param_groups[0]["lr"]
            if scaler is None:
                optimizer.step()
            else:
                scaler.step(optimizer)  # skips the update where a gradient is inf/NaN
                scaler.update()  # halves the scale after an overflow: the only way it shrinks
            skipped = scaler is not None and scaler.get_scale() < scale
            tracker.optimizer_done(optimizer)
            if skipped:  # no update happened: the schedule waits, and no method reads overflowed gradients
                res.skipped_steps.append(step)
            else:
                scheduler.step()
                method.on_step_end(model, step)  # before zero_grad: a method may read this step's gradients
            optimizer.zero_grad(set_to_none=True)
        sync(device)
        res.step_times_s.append(time.perf_counter() - t0)
        if tracking:
            mem = tracker.result()
            if mem["peak_bytes"] > (res.peak_live_tensor_bytes or 0):  # keep the breakdown of the highest step
                res.peak_live_tensor_bytes = mem["peak_bytes"]
                res.memory_at_peak_bytes = mem["at_peak_bytes"]
                res.memory_category_max_bytes = mem["category_max_bytes"]
        res.losses.append(loss_sum)
        res.lrs.append(lr)
        res.grad_norms.append(float(norm))
        res.tokens_per_step.append(sum(int(b["attention_mask"].sum()) for b in micro))
        res.samples_per_step.append(sum(len(b["input_ids"]) for b in micro))
        res.computed_tokens_per_step.append(size)
        res.attention_pairs_per_step.append(sum(pairs for _, pairs in work))
        res.head_positions_per_step.append(sum(getattr(b, "head_positions", 0) for b in drawn))
        if on_step is not None:
            on_step(step + 1, cfg.steps, res.step_times_s[-1])
    res.optimizer_state_bytes = optimizer_state_bytes(optimizer)
    if cfg.optimizer.startswith("paged_"):
        res.paging_effective = paged_state_in_use(optimizer)
    res.cuda = cuda_memory_peaks(device)
    return res
