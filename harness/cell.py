"""One run, inside its own process: load, evaluate, prepare, train, evaluate, export, record.

Everything measured is written to the record even when a later stage fails, so a ``failed`` record still
says how far the run got (e.g. the accuracy before training, or the step whose loss went non-finite).
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from harness.config import RunConfig, TrainConfig
from harness.data import collate, encode, evaluate, train_batches
from harness.flops import flops_per_token, mfu_dtype, peak_flops
from harness.hardware import describe, identity, resolve_config_dtypes
from harness.loop import DTYPES, NonFiniteLoss, set_seed, train
from harness.measure import parameter_counts, peak_rss_bytes, step_time_stats
from harness.memory import nvml_process_bytes
from harness.models import head_module_names, load_model, output_module_names, resolve_mode
from harness.progress import CellProgress
from harness.prompting import (
    collate_prompts,
    continuation_loss,
    encode_prompts,
    evaluate_prompts,
    lm_loss,
)
from harness.records import EvalMetrics, ExportRecord, RunRecord, make_record, now_iso, write_record
from harness.registry import ModelContext, get_method
from harness.tasks import load_task


def _device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _is_oom(err: BaseException) -> bool:
    """CUDA raises OutOfMemoryError; on CPU an allocation over the limit raises MemoryError or a RuntimeError
    from the allocator ("DefaultCPUAllocator: can't allocate memory")."""
    text = str(err).lower()
    return isinstance(err, (MemoryError, torch.OutOfMemoryError)) or any(
        s in text for s in ("out of memory", "can't allocate memory", "cannot allocate memory")
    )


def resolve_dtypes(cfg: RunConfig, device: torch.device) -> tuple[RunConfig, dict[str, dict[str, str]]]:
    """Every ``auto`` dtype (training and the method's own) made concrete for this machine; the record keeps the
    choice, the value and why. The record's ``config`` stays as the suite wrote it."""
    train, resolved = resolve_config_dtypes(TrainConfig, cfg.train.model_dump(), device, prefix="train.")
    method_cfg, more = resolve_config_dtypes(get_method(cfg.method).Config, cfg.method_config, device)
    update = {"train": TrainConfig.model_validate(train), "method_config": method_cfg}
    return cfg.model_copy(update=update), {**resolved, **more}


def _stages(cfg: RunConfig, results_dir: Path, rec: dict[str, Any]) -> None:
    """The run's stages in order; each writes what it measured into ``rec`` as soon as it has it."""
    device = _device()
    cfg, rec["resolved_dtypes"] = resolve_dtypes(cfg, device)
    dtype = DTYPES[cfg.train.dtype]
    progress = CellProgress(cfg, rec["resolved_dtypes"], device)
    progress.say(f"hardware: {describe(identity(device))}")
    progress.say("dtypes: " + "; ".join(f"{k} = {v['value']} ({v['why']})" for k, v in rec["resolved_dtypes"].items()))
    task = load_task(cfg.task)
    rec["task_info"] = task.info()
    mode = resolve_mode(cfg.model.name, cfg.model.mode, cfg.model.trust_remote_code) or "classifier"
    progress.say(f"loading {cfg.model.name}")
    loaded = load_model(cfg.model.name, len(task.labels), cfg.seed, cfg.model.trust_remote_code, mode)
    rec["model_info"] = loaded.info
    tok, pad_id = loaded.tokenizer, loaded.tokenizer.pad_token_id
    n_eval = cfg.train.eval_batch_size
    logit_rows: list[int] = []  # per micro-batch drawn: positions the LM head computes (prompts: B × (K + 1))
    if mode == "prompt":  # decoders: every task is a prompt and scored continuations (harness/prompting.py)
        test_items = encode_prompts(task, task.test, tok, cfg.train.max_seq_len)
        train_items = encode_prompts(task, task.train, tok, cfg.train.max_seq_len)
        batches = _tap(train_batches(train_items, cfg.train.batch_size, cfg.seed, pad_id, collate_prompts), logit_rows)
        objective = continuation_loss

        def calibration(n: int) -> list[dict]:  # prompt + right answer, as in training
            n = min(n, len(train_items))
            return [_inputs(collate_prompts(train_items[i : min(i + 16, n)], pad_id)) for i in range(0, n, 16)]

        def run_eval(m: torch.nn.Module) -> tuple[dict, torch.Tensor]:
            return evaluate_prompts(m, task, test_items, tok, n_eval, dtype, device, cfg.task.max_new_tokens)
    else:  # encoders: a classification head on the text
        test_enc = encode(task.test, tok, cfg.train.max_seq_len)
        train_enc = encode(task.train, tok, cfg.train.max_seq_len)
        batches = _tap(train_batches(train_enc, cfg.train.batch_size, cfg.seed, pad_id), logit_rows)
        objective = None

        def calibration(n: int) -> list[dict]:
            n = min(n, len(train_enc))
            return [_inputs(collate(train_enc[i : min(i + 16, n)], pad_id)) for i in range(0, n, 16)]

        def run_eval(m: torch.nn.Module) -> tuple[dict, torch.Tensor]:
            return evaluate(m, test_enc, n_eval, pad_id, dtype, device)

    method_cls = get_method(cfg.method)
    method = method_cls(method_cls.Config.model_validate(cfg.method_config))
    ctx = ModelContext(
        task_type="causal_lm" if mode == "prompt" else "seq_cls",
        num_labels=len(task.labels),
        model_type=loaded.info["model_type"],
        head_names=head_module_names(loaded.model),
        output_names=output_module_names(loaded.model) if mode == "prompt" else [],
        calibration=calibration,
    )
    model = method.prepare(loaded.model, ctx).to(device)
    rec.update(parameter_counts(model))

    # Before training: for a decoder this is its zero-shot accuracy (as the method prepared it, e.g. quantized).
    progress.say(f"evaluating before training ({len(task.test)} test examples)")
    before, _ = run_eval(model)
    rec["eval_before"] = EvalMetrics(**before)
    held_out = _held_out_texts(cfg) if cfg.forgetting else None
    if held_out:
        f = cfg.forgetting
        rec["forgetting"] = {"task": f.task, "before": lm_loss(model, held_out, tok, f.max_seq_len, dtype, device)}

    set_seed(cfg.seed)
    t0 = time.perf_counter()
    try:
        res = train(model, method, batches, cfg.train, cfg.seed, device, objective, progress.step)
    except NonFiniteLoss as err:  # keep the curve up to the bad step in the failed record
        rec.update(
            losses=err.result.losses,
            lrs=err.result.lrs,
            grad_norms=err.result.grad_norms,
            step_times_s=err.result.step_times_s,
        )
        raise
    rec["train_time_s"] = time.perf_counter() - t0
    measured = res.measured_step_times_s
    n_warm = res.timing_warmup_steps
    rec.update(
        losses=res.losses,
        lrs=res.lrs,
        grad_norms=res.grad_norms,
        step_times_s=res.step_times_s,
        timing_warmup_steps=n_warm,
        step_time_stats=step_time_stats(measured),
        final_loss=res.losses[-1],
        tokens_per_s=sum(res.tokens_per_step[n_warm:]) / sum(measured) if measured else None,
        samples_per_s=sum(res.samples_per_step[n_warm:]) / sum(measured) if measured else None,
        peak_live_tensor_bytes=res.peak_live_tensor_bytes,
        optimizer_state_bytes=res.optimizer_state_bytes,
        memory_at_peak_bytes=res.memory_at_peak_bytes,
        memory_category_max_bytes=res.memory_category_max_bytes,
        nvml_process_bytes=nvml_process_bytes() if device.type == "cuda" else None,
        optimizer=cfg.train.optimizer,
        paging_effective=res.paging_effective,
        cuda_max_allocated_bytes=res.cuda.get("cuda_max_allocated_bytes"),
        cuda_max_reserved_bytes=res.cuda.get("cuda_max_reserved_bytes"),
    )
    fpt = flops_per_token(model, frozenset(ctx.output_names))
    if measured:
        computed = res.computed_tokens_per_step[n_warm:]
        # the LM head runs on the kept positions only (prompts), every other layer on every computed token
        acc = cfg.train.grad_accum
        positions = [sum(logit_rows[i * acc : (i + 1) * acc]) for i in range(len(res.step_times_s))][n_warm:]
        per_pos = fpt["output_per_position"]
        step_flops = [fpt["total"] * c + per_pos * p for c, p in zip(computed, positions, strict=True)]
        compute = mfu_dtype(cfg.train.dtype, cfg.method_config)
        peak = peak_flops(results_dir, compute, device)
        rec.update(
            flops_per_token=fpt,
            model_flops_per_step=sum(step_flops) / len(step_flops),
            peak_matmul_flops=peak["peak_matmul_flops"],
            peak_matmul_info={k: v for k, v in peak.items() if k != "peak_matmul_flops"},
            mfu_dtype=compute,
            mfu=sum(step_flops) / sum(measured) / peak["peak_matmul_flops"],
        )
    rec["memory_methods"] = {
        "peak_live_tensor_bytes": "live tensor storages (TorchDispatchMode + weakrefs) over the timing warm-up steps",
        "memory_at_peak_bytes": "same, by category; categories settled at step end (harness/memory.py)",
        "peak_rss_bytes": "getrusage(RUSAGE_SELF).ru_maxrss of the run process (whole run, incl. loading/eval)",
        "optimizer_state_bytes": "sum of optimizer state tensor storages after training",
    }
    if device.type == "cuda":
        rec["memory_methods"]["cuda_max_allocated_bytes"] = "torch.cuda.max_memory_allocated over training"
        rec["memory_methods"]["cuda_max_reserved_bytes"] = "torch.cuda.max_memory_reserved over training"
        rec["memory_methods"]["nvml_process_bytes"] = "NVML compute-process usedGpuMemory for this pid"

    progress.say(f"evaluating after training ({len(task.test)} test examples)")
    after, logits = run_eval(model)
    rec["eval_after"] = EvalMetrics(**after)
    if held_out:
        rec["forgetting"]["after"] = lm_loss(model, held_out, tok, cfg.forgetting.max_seq_len, dtype, device)

    if cfg.export:
        progress.say("exporting")
        exports = method.export(model, results_dir / "exports" / cfg.cell_id)
        out = []
        for e in exports:
            er = ExportRecord(
                kind=e.kind,
                path=str(e.path),
                bytes_on_disk=e.bytes_on_disk,
                notes=e.notes,
                unsupported=e.unsupported or None,
            )
            if e.model is not None:
                progress.say(f"evaluating export {e.kind}")
                m, elogits = run_eval(e.model.to(device))
                er.eval = EvalMetrics(**m)
                er.max_abs_logit_diff = float((elogits - logits).abs().max())
            out.append(er)
        rec["exports"] = out
        rec["export_bytes"] = sum(e.bytes_on_disk for e in exports)
    rec["method_metrics"] = method.report(model)


def _tap(batches: Iterator[dict], logit_rows: list[int]) -> Iterator[dict]:
    """Pass batches through, noting for each how many positions get vocabulary logits (0 for a head)."""
    for b in batches:
        labels = b["labels"]
        logit_rows.append(labels.shape[0] * (labels.shape[1] + 1) if labels.dim() == 2 else 0)
        yield b


def _inputs(batch: dict) -> dict:
    """Model inputs only (calibration needs no labels)."""
    return {k: v for k, v in batch.items() if k != "labels"}


def _held_out_texts(cfg: RunConfig) -> list[str]:
    """The forgetting measure's text: test examples of another task (its own seeded split)."""
    from harness.config import TaskSpec

    data = load_task(TaskSpec(name=cfg.forgetting.task))
    return [" ".join(filter(None, (x.text_pair, x.text))) for x in data.test[: cfg.forgetting.examples]]


def run_cell(cfg: RunConfig, results_dir: Path) -> RunRecord:
    """Execute one cell and write its record (ok, failed or oom). Never raises for a failing run."""
    started, t0 = now_iso(), time.perf_counter()
    rec: dict[str, Any] = {}
    status, error = "ok", None
    try:
        _stages(cfg, results_dir, rec)
    except Exception as err:  # a failing run is a result, not a crash of the suite
        status = "oom" if _is_oom(err) else "failed"
        tb = traceback.format_exc(limit=-3)
        error = f"{type(err).__name__}: {err}\n{tb}"
    record = make_record(cfg, status, error, started, time.perf_counter() - t0, peak_rss_bytes=peak_rss_bytes(), **rec)
    write_record(results_dir, record)
    return record
