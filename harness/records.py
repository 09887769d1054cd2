"""Run records: one JSON file per run, typed, with units in field names, written atomically.

Raw values are kept (every step's loss and time); statistics are derived from them and stored beside them
for convenience. Failures (``failed``, ``oom``, ``timeout``) are records too, with the error text. Every
record carries the full resolved config and the environment it ran in.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from harness.atomic import atomic_write_text
from harness.environment import environment

SCHEMA_VERSION = 2  # 2: the loop's figures nested in ``training`` (schema 1 kept them at the top; still read)
Status = Literal["ok", "failed", "oom", "timeout", "pruned"]  # pruned: a tuning trial stopped early


class EvalMetrics(BaseModel):
    """Test-split metrics. Classifier heads: loss is the mean cross-entropy over the labels. Prompts: loss is
    the mean NLL per token of the right continuation; multiple choice adds the accuracy normalised per character
    of each choice (lm-evaluation-harness's acc_norm); generation's accuracy is exact (numeric) match and a few
    generated answers are kept to read."""

    accuracy: float
    macro_f1: float | None = None
    loss: float
    examples: int
    accuracy_norm: float | None = None
    generated_samples: list[dict[str, Any]] | None = None
    generations_cut: int | None = Field(
        None, description="generation: answers that ran into max_new_tokens before a newline or the end of text"
    )
    correct: str | None = Field(
        None, description="per test example in the split's order, '1' right / '0' wrong: for paired tests"
    )
    predicted: str | None = Field(
        None,
        description="per test example in the split's order, the index of the label (multiple choice: choice) "
        "predicted, comma-separated like task_info.test_label_ids, the right ones (read with label_ids)",
    )


def label_ids(text: str | None) -> list[int]:
    """``EvalMetrics.predicted`` or ``task_info["test_label_ids"]`` (comma-separated, one line in a record rather
    than a thousand) as a list of label indices; [] for none."""
    return [int(x) for x in text.split(",")] if text else []


class SplitInputs(BaseModel):
    """One split's inputs as the model read them, in tokens (harness/tasks/data.py: input_lengths)."""

    examples: int
    cut: int = Field(description="examples longer than train.max_seq_len, cut to it (their text's end unread)")
    tokens_median_uncut: float
    tokens_max_uncut: int


class DeploymentRecord(BaseModel):
    """One deployable form of an export (harness/cell/deploy.py): loaded from disk, evaluated, timed at batch 1."""

    name: str = Field(description="the form, e.g. fp32, bf16, int4 kernel, nf4 + adapter")
    dtype: str = Field(description="the dtype its matmuls run in")
    load_time_s: float | None = Field(None, description="from disk to a model ready to run (None: no loader)")
    note: str = ""
    eval: EvalMetrics | None = Field(None, description="on the test split, without autocast: as deployed")
    latency: dict[str, Any] | None = Field(
        None, description="decoder: prefill and decode_per_token; encoder: batch_1/batch_32_per_example (seconds)"
    )
    skipped: str | None = Field(None, description="why it was not measured on this machine")
    error: str | None = None


class ExportRecord(BaseModel):
    """One artifact a method exported: kind, path, size, and how it scored and deployed."""

    kind: str
    path: str
    bytes_on_disk: int
    eval: EvalMetrics | None = None
    max_abs_logit_diff: float | None = Field(
        None,
        description="vs the trained in-memory model, on the test split, both in the run's dtype (bf16 autocast "
        "rounding included); prompts: of each continuation's summed log-likelihood",
    )
    predictions_differing: float | None = Field(
        None, description="share of test predictions that differ from the trained in-memory model's (0: as trained)"
    )
    bits_per_weight_on_disk: float | None = Field(
        None, description="8 × bytes on disk / the served model's parameters (every tensor counted: embeddings too)"
    )
    notes: str = ""
    unsupported: str | None = Field(None, description="why the method could not make this artifact (none written)")
    error: str | None = Field(None, description="why making, reloading or scoring this artifact failed (run stays ok)")
    format: str = Field("", description="a quantized artifact's format as served (INT4 g32 RTN, NF4 b64 DQ); '': float")
    deployments: list[DeploymentRecord] = Field(default_factory=list)


class TrainingRecord(BaseModel):
    """What THE loop measured (harness/cell/loop.py): every step's raw values, what derives from them over the
    measured steps, and the training step's memory, each figure named with its unit."""

    model_config = ConfigDict(extra="forbid", ser_json_inf_nan="constants")

    losses: list[float] = Field(default_factory=list, description="per optimizer step, mean over micro-batches")
    lrs: list[float] = Field(default_factory=list)
    grad_norms: list[float] = Field(default_factory=list)
    step_times_s: list[float] = Field(default_factory=list, description="every step, warm-up included")
    timing_warmup_steps: int = 0
    memory_tracked_steps: list[int] = Field(
        default_factory=list,
        description="steps whose memory was tracked (warm-up, step 1, each new largest batch): not timed",
    )
    step_time_stats: dict[str, float | int | None] = Field(default_factory=dict, description="measured steps only")
    final_loss: float | None = None
    tokens_per_s: float | None = Field(None, description="non-pad tokens over measured steps")
    samples_per_s: float | None = None
    train_time_s: float | None = Field(None, description="the loop's wall time, validation included")
    peak_live_tensor_bytes: int | None = Field(None, description="peak of live tensor storages in a tracked step")
    memory_at_peak_bytes: dict[str, int] = Field(default_factory=dict, description="category -> bytes at the peak")
    memory_category_max_bytes: dict[str, int] = Field(default_factory=dict, description="category -> own maximum")
    nvml_process_bytes: int | None = Field(None, description="CUDA: NVML's figure for this process")
    cuda_max_allocated_bytes: int | None = None
    cuda_max_reserved_bytes: int | None = None
    optimizer_state_bytes: int | None = None
    optimizer: str | None = Field(None, description="the suite's optimizer by name, or the method's own by class")
    optimizer_implementation: str | None = Field(
        None, description="how its update ran: fused | foreach | for-loop (torch), or the library's name"
    )
    optimizer_groups: list[dict[str, Any]] = Field(
        default_factory=list, description="each parameter group: name, tensors, elements, lr and its own options"
    )
    paging_effective: bool | None = Field(None, description="true only where optimizer state really was paged")
    loss_scales: list[float] = Field(
        default_factory=list, description="fp16 only: the loss scale each step's backward ran with (dynamic scaling)"
    )
    skipped_steps: list[int] = Field(
        default_factory=list, description="fp16 only: steps whose gradients overflowed, so no update was made"
    )


class RunRecord(BaseModel):
    # NaN/inf losses are data (a diverged run), written as JSON constants (NaN) rather than lost as null
    """One run's record: its config, environment and hardware, and every figure it measured."""

    model_config = ConfigDict(extra="forbid", ser_json_inf_nan="constants")

    schema_version: int = SCHEMA_VERSION
    cell_id: str
    suite: str
    method: str
    variant: str
    model: str
    task: str
    seed: int
    status: Status
    error: str | None = None
    started_at: str
    wall_time_s: float
    config: dict[str, Any]
    environment: dict[str, Any]
    model_info: dict[str, Any] = Field(default_factory=dict)
    task_info: dict[str, Any] = Field(default_factory=dict)
    input_lengths: dict[str, SplitInputs] = Field(
        default_factory=dict, description="train and test: how many inputs were cut to max_seq_len (a TaskIO's own)"
    )
    measured_only: str | None = Field(
        None, description="why this run has no accuracy (random weights, or a task with nothing to score)"
    )
    energy: dict[str, Any] | None = Field(
        None,
        description="the training loop's joules and joules per 1k training tokens from NVML or RAPL, with the "
        "source; or not_measured and why",
    )
    estimate: dict[str, Any] | None = Field(
        None, description="`ftbench estimate`'s prediction for exactly this config: bytes by category and peak"
    )
    # parameters
    total_params: int | None = None
    trainable_params: int | None = None
    trainable_pct: float | None = None
    weight_bytes: int | None = Field(None, description="parameter storage incl. packed 4-bit weights + constants")
    training: TrainingRecord = Field(default_factory=TrainingRecord, description="what THE loop measured (loop.py)")
    stage_seconds: dict[str, float] = Field(
        default_factory=dict,
        description="wall seconds of each stage of the cell: load, prepare, train (validation included), evaluate "
        "(the test split after training), export (exports written and evaluated), deploy, evaluate_before",
    )
    flops_per_token: dict[str, float] = Field(
        default_factory=dict, description="model FLOPs (harness/measure/flops.py)"
    )
    model_flops_per_step: float | None = Field(None, description="mean over measured steps")
    peak_matmul_flops: float | None = Field(None, description="this machine, run dtype, measured per suite")
    mfu: float | None = Field(None, description="model FLOP/s over measured steps / peak_matmul_flops")
    mfu_dtype: str | None = Field(None, description="the dtype whose peak MFU is measured against")
    hfu: float | None = Field(
        None, description="as mfu, counting the forward that grad_checkpointing recomputes (equal to mfu without it)"
    )
    peak_matmul_info: dict[str, Any] = Field(
        default_factory=dict, description="how the peak was measured: size, repeats, seconds, load, source"
    )
    contention: dict[str, Any] = Field(
        default_factory=dict,
        description="other processes' CPU use while training: other_processes_cores, loadavg_1m_before/after, "
        "loaded (> 0.5 cores: step times and MFU measured under load)",
    )
    resolved_dtypes: dict[str, dict[str, str]] = Field(
        default_factory=dict, description="dtype fields: {field: {choice, value, why}} (auto resolved per machine)"
    )
    # memory: the training step's figures are in training; this one is the whole process's
    peak_rss_bytes: int | None = Field(None, description="process peak resident set size (whole run)")
    memory_methods: dict[str, str] = Field(default_factory=dict)
    # quality
    eval_before: EvalMetrics | None = None
    eval_before_from: str | None = Field(
        None,
        description="the cell whose measurement of the untrained model this run shares: both methods start as the "
        "base model (full fine-tuning, LoRA), with the same model, task, seed, dtype and evaluation settings",
    )
    starts_as_base: bool | None = Field(None, description="Method.starts_as_base: eval_before is the base model's")
    eval_after: EvalMetrics | None = None
    validation_curve: list[dict[str, Any]] = Field(
        default_factory=list, description="every eval_every steps: {step, loss, accuracy, ..., examples, seconds}"
    )
    selected_step: int | None = Field(None, description="the step whose weights were tested and exported")
    selected_by: str | None = Field(None, description="last, val_accuracy or val_loss")
    forgetting: dict[str, Any] | None = Field(
        None, description="LM loss on another task's held-out text: {task, before: {lm_loss, ...}, after: {...}}"
    )
    exports: list[ExportRecord] = Field(default_factory=list)
    method_metrics: dict[str, Any] = Field(default_factory=dict, description="figures the method reports itself")
    export_bytes: int | None = Field(None, description="total bytes of every export on disk")

    @model_validator(mode="before")
    @classmethod
    def _nest_training(cls, data: Any) -> Any:
        """A schema-1 record kept the loop's figures at the top level: read them into ``training``."""
        if isinstance(data, dict) and (flat := TrainingRecord.model_fields.keys() & data.keys()):
            data = dict(data)
            data["training"] = {**(data.get("training") or {}), **{k: data.pop(k) for k in flat}}
        return data


def make_record(cfg, status: str, error: str | None, started_at: str, wall_time_s: float, **fields) -> RunRecord:
    """A record for cell ``cfg`` (a harness.schema.RunConfig): its identity, full config and environment."""
    return RunRecord(
        cell_id=cfg.cell_id,
        suite=cfg.suite,
        method=cfg.method,
        variant=cfg.variant,
        model=cfg.model.name,
        task=cfg.task.display_name,
        seed=cfg.seed,
        status=status,
        error=error,
        started_at=started_at,
        wall_time_s=wall_time_s,
        config=cfg.model_dump(mode="json"),
        environment=environment(),
        **fields,
    )


def now_iso() -> str:
    """The current UTC time, ISO 8601."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def cell_identity(cell_id: str) -> str:
    """A cell id without its config hash: model, task, method/variant, seed."""
    return cell_id.rsplit("__", 1)[0]


def record_path(results_dir: Path, cell_id: str) -> Path:
    """Where a cell's record lives in a results dir."""
    return Path(results_dir) / "records" / f"{cell_id}.json"


def write_record(results_dir: Path, rec: RunRecord) -> Path:
    """Write a record atomically (temp file, fsync, rename); return its path."""
    path = record_path(results_dir, rec.cell_id)
    atomic_write_text(path, rec.model_dump_json(indent=1))
    return path


class _ReadRecord(RunRecord):
    """Reading is forward compatible: fields a newer ftbench wrote are ignored, not an error. (Writing stays
    strict: a misspelled field is a bug.)"""

    model_config = ConfigDict(extra="ignore")


def read_record(path: Path) -> RunRecord:
    """The record at ``path``; a file that is not one raises ValueError saying what is wrong, in the record's
    terms (the field and the problem), never the reader's internal class name."""
    try:
        return RunRecord.model_validate(_ReadRecord.model_validate_json(Path(path).read_text()).model_dump())
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(map(str, first["loc"])) or "the file"
        more = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
        raise ValueError(f"not an ftbench record: {where}: {first['msg']}{more}") from None


def read_current(results_dir: Path) -> tuple[list[RunRecord], list[str]]:
    """The records of a results dir that belong to its suite's current cells (``cells_index.json``, written by
    each run), in the suite's cell order, and what was left out, each named: records that cannot be read, and
    records of a cell's other configs (a dir from an older ftbench, without an index: the newest of each cell).
    The one owner of "which records are current": the summary, the report, compare and claims all read this."""
    results_dir = Path(results_dir)
    problems: list[str] = []
    order = None
    try:
        order = {cid: i for i, cid in enumerate(json.loads((results_dir / "cells_index.json").read_text()))}
    except FileNotFoundError:
        pass
    except (OSError, ValueError, TypeError) as err:
        problems.append(f"{results_dir / 'cells_index.json'} is unreadable ({type(err).__name__}); cell order unknown")
    records = []
    for p in sorted((results_dir / "records").glob("*.json")):
        try:
            records.append(read_record(p))
        except (OSError, ValueError) as err:
            problems.append(f"unreadable record {p}: {str(err).splitlines()[0][:200]}")
    records, stale = _current(records, order)
    if stale:
        problems.append(
            f"{len(stale)} record(s) of an earlier config of a cell (or of a cell this suite no longer has) left "
            f"out: {', '.join(sorted(r.cell_id for r in stale)[:5])}{' …' if len(stale) > 5 else ''}"
        )
    if order is not None:
        records.sort(key=lambda r: order.get(r.cell_id, len(order)))
    return records, problems


def _current(records: list[RunRecord], index: dict | None) -> tuple[list[RunRecord], list[RunRecord]]:
    """(kept, stale): with the suite's cell index, the records of its cells; and of several records of one cell
    identity (a config changed between runs), only the newest. One cell never shows two configs."""
    kept, stale = [], []
    for r in records:
        (kept if index is None or r.cell_id in index else stale).append(r)
    newest: dict[str, RunRecord] = {}
    for r in kept:
        key = cell_identity(r.cell_id)
        if key in newest:
            older, newer = sorted((newest[key], r), key=lambda x: x.started_at)
            stale.append(older)
            newest[key] = newer
        else:
            newest[key] = r
    return list(newest.values()), stale


def load_records(results_dir: Path) -> pd.DataFrame:
    """The current records of a results dir (:func:`read_current`) as a DataFrame: one row per run, nested fields
    flattened with dots. What was left out is named on stderr."""
    import sys

    records, problems = read_current(results_dir)
    for p in problems:
        print(f"warning: {p}", file=sys.stderr)
    if not records:
        return pd.DataFrame()
    return pd.json_normalize([r.model_dump(mode="json") for r in records], max_level=1)


def timed_steps(n: int, warmup: int, tracked: list[int]) -> list[int]:
    """The steps whose times count: after the warm-up, and not slowed by memory tracking."""
    skip = set(tracked)
    return [i for i in range(warmup, n) if i not in skip]


def measured_step_times_s(r: RunRecord) -> list[float]:
    """A record's timed steps: after the warm-up, and not slowed by memory tracking."""
    t = r.training
    return [t.step_times_s[i] for i in timed_steps(len(t.step_times_s), t.timing_warmup_steps, t.memory_tracked_steps)]


def headline_latency_s(lat: dict[str, Any] | None) -> float | None:
    """The one latency figure of a deployment: seconds per generated token (decoders) or per example at batch 1
    (encoders)."""
    if not lat:
        return None
    block = lat.get("decode_per_token") if lat["kind"] == "decoder" else lat.get("batch_1_per_example")
    return block["median_s"] if block else None
