"""One run, inside its own process: load, evaluate, prepare, train, evaluate, export, record.

Everything measured is written to the record even when a later stage fails, so a ``failed`` record still
says how far the run got (e.g. the step whose loss went non-finite, or the accuracy after training when an
export failed). The test split is read once training and checkpoint selection are over, never before.
The cell drives two contracts (:mod:`harness.contract`) and branches on neither: the *method* and the
*task IO* (a classifier head, or a decoder reading every task through prompts).
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from harness import __version__
from harness.atomic import atomic_write_text
from harness.cell.deploy import measure as measure_deployments
from harness.cell.exports import evaluate_exports
from harness.cell.loop import LoopResult, NonFiniteLoss, set_seed, train
from harness.cell.models import head_module_names, load_model, resolve_mode
from harness.contract import Export, Method, ModelContext, Pruned, TaskIO, error_text
from harness.environment import describe, git
from harness.measure.energy import EnergyMeter
from harness.measure.flops import mfu_dtype, training_flops
from harness.measure.hardware import DTYPES, default_device, identity, resolve_config_dtypes
from harness.measure.memory import nvml_process_bytes
from harness.measure.plan import estimate_run
from harness.measure.runstats import Contention, memory_methods, parameter_counts, peak_rss_bytes
from harness.progress import CellProgress
from harness.records import EvalMetrics, RunRecord, make_record, now_iso, write_record
from harness.registry import build_method, get_method, load_method_file
from harness.schema import RunConfig, TaskSpec, TrainConfig
from harness.tasks.builtin import load_task
from harness.tasks.classifier import ClassifierIO
from harness.tasks.data import cut_note
from harness.tasks.prompting import PromptIO, lm_loss

TASK_IO: dict[str, type] = {"classifier": ClassifierIO, "prompt": PromptIO}  # by the model's mode


def task_io(task, mode: str) -> type:
    """The TaskIO class that reads ``task``: the task's own (``TaskData.io``, e.g. synthetic) or the mode's."""
    if task.io is None:
        return TASK_IO[mode]
    import importlib

    module, _, name = task.io.partition(":")
    return getattr(importlib.import_module(module), name)


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
    method_cls = get_method(cfg.method)
    method_cfg, more = resolve_config_dtypes(method_cls.Config, cfg.method_config, device, train_dtype=train["dtype"])
    update = {"train": TrainConfig.model_validate(train), "method_config": method_cfg}
    return cfg.model_copy(update=update), {**resolved, **more}


class _Stopwatch:
    """Wall seconds per stage, into the record as each stage ends (so a failed record has them too)."""

    def __init__(self, into: dict[str, float]) -> None:
        self.seconds, self.t = into, time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.seconds[stage] = self.seconds.get(stage, 0.0) + now - self.t
        self.t = now


def _stages(cfg: RunConfig, results_dir: Path, rec: dict[str, Any]) -> None:
    """The run's stages in order; each writes what it measured into ``rec`` as soon as it has it."""
    clock = _Stopwatch(rec.setdefault("stage_seconds", {}))
    if cfg.method_source:  # a method from a file beside the suite: registered in this process too
        load_method_file(cfg.method_source)
    device = default_device(cfg.device)
    if device.index is not None:  # cuda:N: the allocator's peak counters and NVML read the current device
        torch.cuda.set_device(device)
    cell_id = cfg.cell_id  # the record's: the config as the suite wrote it, `auto` dtypes unresolved
    cfg, rec["resolved_dtypes"] = resolve_dtypes(cfg, device)
    dtype = DTYPES[cfg.train.dtype]
    progress = CellProgress(cfg, rec["resolved_dtypes"], device)
    progress.say(f"hardware: {describe(identity(device))}")
    progress.say("dtypes: " + "; ".join(f"{k} = {v['value']} ({v['why']})" for k, v in rec["resolved_dtypes"].items()))
    task = load_task(cfg.task)
    rec["task_info"] = task.info()
    if cfg.train.val_examples:
        task.validation = task.validation[: cfg.train.val_examples]
    mode = resolve_mode(cfg.model.name, cfg.model.mode, cfg.model.trust_remote_code) or "classifier"
    progress.say(f"loading {cfg.model.name}")
    m = cfg.model
    n = len(task.labels)
    base_args = (m.name, n, cfg.seed, m.trust_remote_code, mode, m.allow_pickle, m.init, device, task.labels)
    loaded = load_model(*base_args)
    rec["model_info"] = loaded.info
    if new := loaded.info.get("new_modules"):
        progress.say(
            f"not in the checkpoint, initialized at random and trained in full by every method: {', '.join(new)}"
        )
    io: TaskIO = task_io(task, mode)(task, loaded.tokenizer, cfg.train.max_seq_len, cfg.task.max_new_tokens)
    # Random weights (a *-shape, init: random) or a task with nothing to score (synthetic): memory and speed only.
    # The test split is never read, nothing is exported, and the record has no accuracy to be mistaken for one.
    scored = loaded.info["weights"] != "random" and getattr(io, "scored", True)
    rec["input_lengths"] = getattr(io, "input_lengths", dict)()  # optional in the contract: a user's TaskIO may not
    if note := cut_note(rec["input_lengths"], cfg.train.max_seq_len):
        progress.say(f"{task.name}: {note}")
    if not scored:
        random = loaded.info["weights"] == "random"
        why = loaded.info["weights_note"] if random else f"task {task.name}: nothing to score: memory and speed only"
        rec["measured_only"] = why
    rec["estimate"] = estimate_run(cfg, loaded.model, io.task_type == "causal_lm", device_type=device.type)
    clock.lap("load")

    def evaluate(m: torch.nn.Module) -> tuple[dict, torch.Tensor]:
        return io.evaluate(m, cfg.train.eval_batch_size, dtype, device)

    method = build_method(cfg.method, cfg.method_config)
    ctx = ModelContext(
        task_type=io.task_type,
        num_labels=len(task.labels),
        model_type=loaded.info["model_type"],
        head_names=sorted({*head_module_names(loaded.model), *loaded.info.get("new_modules", [])}),
        output_names=io.output_names(loaded.model),
        calibration=io.calibration,
        train_steps=cfg.train.steps,
        load_base=(lambda: load_model(*base_args).model) if loaded.info.get("pretrained") else None,
    )
    model = method.prepare(loaded.model, ctx).to(device)
    rec.update(parameter_counts(model), starts_as_base=method.starts_as_base())

    # The test split is read only after training and selection (never by a tuning trial, whose read_test is
    # false). The untrained model's score (a decoder's zero-shot accuracy, as the method prepared it, e.g.
    # quantized) is measured then too, on the trainable parameters' initial values kept on disk: on disk so that
    # the copy adds nothing to the memory this run measures.
    reads_test = cfg.read_test and scored
    shared = _shared_before(cfg, method, results_dir, device) if reads_test else None
    shared_score = _read_shared(shared)  # already measured by another cell of this suite: nothing to keep
    initial = _InitialWeights(model, method) if reads_test and shared_score is None else None
    clock.lap("prepare")
    validation = Validation(
        cfg.train, lambda m: io.evaluate(m, cfg.train.eval_batch_size, dtype, device, "validation"), cfg.trial
    )
    res = _train(model, method, io, cfg, device, progress, rec, validation)
    validation.restore_selected(model, method)  # select: val_* puts the best step's weights back
    rec.update(validation.fields())
    compute = mfu_dtype(cfg.train.dtype, method.compute_dtype(), device)
    shape = method.positions_added(), cfg.train.grad_checkpointing, method.trains_inputs()
    rec.update(training_flops(model, ctx.output_names, res, compute, results_dir, device, *shape))
    rec["memory_methods"] = memory_methods(device.type)
    clock.lap("train")

    if not reads_test:
        return
    progress.say(f"evaluating after training ({len(task.test)} test examples)")
    after, scores = evaluate(model)
    rec["eval_after"] = EvalMetrics(**after)
    forgetting = _forgetting(cfg, loaded.tokenizer, dtype, device)
    if forgetting:
        rec["forgetting"] = {"task": cfg.forgetting.task, "after": forgetting(model)}
    clock.lap("evaluate")
    if cfg.export:
        # float32 scores (no autocast): what a float32 form with the same weights would score, so it is reused
        known = {id(model): (model, after)} if dtype == torch.float32 else None
        deployments = None
        if cfg.deploy.enabled:  # as deployed: each form in its own dtype, no autocast

            def deployments(e: Export) -> list:
                clock.lap("export")
                plain = lambda m: io.evaluate(m, cfg.train.eval_batch_size, torch.float32, device)  # noqa: E731
                causal, seq = io.task_type == "causal_lm", cfg.train.max_seq_len  # the TaskIO says how it decodes
                forms = measure_deployments(e, plain, causal, seq, cfg.deploy, device, progress.say, known or {})
                clock.lap("deploy")
                return forms

        out_dir = results_dir / "exports" / cell_id
        tok = loaded.tokenizer
        rec.update(
            evaluate_exports(method, model, out_dir, evaluate, scores, progress, device, deployments, known, tok)
        )
        clock.lap("export")
    rec["method_metrics"] = method.report(model)
    shared_score = shared_score or _read_shared(shared)
    if shared_score is not None:
        rec["eval_before_from"], rec["eval_before"] = shared_score
        progress.say(f"the untrained model: as scored by {shared_score[0]} ({cfg.method} starts as the base model)")
        if initial is not None:
            initial.discard()
    else:
        progress.say(f"evaluating the untrained model ({len(task.test)} test examples)")
        initial.restore(model)
        rec["eval_before"] = EvalMetrics(**evaluate(model)[0])
        if shared is not None:
            shared.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(shared, json.dumps({"cell_id": cell_id, "metrics": rec["eval_before"].model_dump()}))
    if forgetting:
        rec["forgetting"]["before"] = forgetting(model)
    clock.lap("evaluate_before")


def _shared_before(cfg: RunConfig, method: Method, results_dir: Path, device: torch.device) -> Path | None:
    """Where a method that starts as the base model (``Method.starts_as_base``) finds or leaves the untrained
    model's score for the suite's other cells, keyed by all that decides it: the model, the task and its split,
    the seed (a new head's initialisation), the dtype, the evaluation's batch and sequence length, the device."""
    if not method.starts_as_base() or cfg.forgetting:
        return None
    import transformers

    t = cfg.train
    key = [cfg.model.model_dump(mode="json"), cfg.task.model_dump(mode="json"), cfg.seed, t.dtype, t.eval_batch_size]
    key += [t.max_seq_len, str(device)]
    # and the code that computes it: a suite resumed after an upgrade or on another commit measures afresh
    key += [__version__, torch.__version__, transformers.__version__, git("rev-parse", "HEAD")]
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    return results_dir / "shared" / f"eval_before-{digest}.json"


def _read_shared(path: Path | None) -> tuple[str, EvalMetrics] | None:
    try:
        stored = json.loads(path.read_text()) if path is not None else None
        return (stored["cell_id"], EvalMetrics(**stored["metrics"])) if stored else None
    except (OSError, ValueError, KeyError, TypeError):  # none yet, or unreadable: measure it here
        return None


class _InitialWeights:
    """The trainable parameters as the method prepared them, in an anonymous file in ``TMPDIR``: unlinked as it is
    made, so it goes when this process ends, however it ends (a named one outlived each failed or killed cell)."""

    def __init__(self, model: torch.nn.Module, method: Method) -> None:
        self.method = method
        self._file = tempfile.TemporaryFile(prefix="ftbench-initial-")
        torch.save({n: p.detach().cpu() for n, p in method.trainable_parameters(model)}, self._file)

    def restore(self, model: torch.nn.Module) -> None:
        self._file.seek(0)
        saved = torch.load(self._file, map_location="cpu", weights_only=True)
        with torch.no_grad():
            for n, p in self.method.trainable_parameters(model):
                p.copy_(saved[n])
        self.discard()

    def discard(self) -> None:
        self._file.close()


class Validation:
    """The validation curve (every ``eval_every`` steps and after the last, outside the timed steps) and, with
    ``select: val_accuracy | val_loss``, a copy of the trainable parameters at the best step so far."""

    def __init__(self, train: TrainConfig, evaluate: Callable, trial: dict | None = None):
        self.every, self.select, self.evaluate = train.eval_every, train.select, evaluate
        self.curve: list[dict] = []
        self.best: tuple[float, int, dict] | None = None  # (score, step, parameters)
        self.trial = None
        if trial is not None:  # a tuning trial tells its study each point; its pruner may stop it
            from harness.cell.trial import TrialReporter

            self.trial = TrialReporter(trial)

    def after_step(self, model: torch.nn.Module, method: Method, done: int, total: int) -> None:
        if not self.every or (done % self.every and done != total):
            return
        t0 = time.perf_counter()
        m, _ = self.evaluate(model)
        keep = ("loss", "accuracy", "macro_f1", "accuracy_norm", "examples")
        self.curve.append({"step": done, **{k: m[k] for k in keep if m.get(k) is not None}})
        self.curve[-1]["seconds"] = time.perf_counter() - t0
        if self.trial is not None:
            self.trial.report(done, m, self.curve)  # raises Pruned where the study's pruner says stop
        if self.select != "last":
            score = m["accuracy"] if self.select == "val_accuracy" else -m["loss"]
            if self.best is None or score > self.best[0]:  # ties keep the earlier step
                params = {n: p.detach().clone() for n, p in method.trainable_parameters(model)}
                self.best = (score, done, params)

    def restore_selected(self, model: torch.nn.Module, method: Method) -> None:
        if self.best is None:
            return
        with torch.no_grad():
            for n, p in method.trainable_parameters(model):
                p.copy_(self.best[2][n])

    def fields(self) -> dict:
        if not self.every:
            return {}
        step = self.best[1] if self.best else (self.curve[-1]["step"] if self.curve else None)
        return {"validation_curve": self.curve, "selected_step": step, "selected_by": self.select}


def _train(model, method: Method, io: TaskIO, cfg: RunConfig, device, progress, rec: dict, validation) -> LoopResult:
    """THE loop (harness/cell/loop.py) on the task's batches and objective; its measurements into ``rec``. After each
    step (outside its timing) the runner hears of it and the validation split may be evaluated."""
    set_seed(cfg.seed)
    t0 = time.perf_counter()
    batches = io.batches(cfg.train.batch_size, cfg.seed, cfg.train.group_by_length)

    def on_step(done: int, total: int, step_time_s: float) -> None:
        contention.step()
        progress.step(done, total, step_time_s)
        validation.after_step(model, method, done, total)

    contention = Contention()  # other processes' CPU use while we train: flags step times measured under load
    energy = EnergyMeter(device)  # a hardware counter (NVML, RAPL) or "not measured", never an estimate
    energy.start()
    try:
        res = train(model, method, batches, cfg.train, cfg.seed, device, io.objective, on_step)
    except NonFiniteLoss as err:  # keep the curve up to the bad step in the failed record
        rec["training"] = err.result.record()
        raise
    rec["energy"] = energy.stop(sum(res.tokens_per_step))
    rec["contention"] = contention.result()
    if note := Contention.note(rec["contention"]):
        progress.say(note)
    nvml = nvml_process_bytes() if device.type == "cuda" else None
    rec["training"] = res.record(train_time_s=time.perf_counter() - t0, nvml_bytes=nvml)
    return res


def _forgetting(cfg: RunConfig, tokenizer, dtype, device) -> Callable[[torch.nn.Module], dict] | None:
    """The forgetting measure, if the suite asks: LM loss on test texts of another task (its own seeded split)."""
    f = cfg.forgetting
    if not f:
        return None
    data = load_task(TaskSpec(name=f.task))
    texts = [" ".join(filter(None, (x.text_pair, x.text))) for x in data.test[: f.examples]]
    return lambda model: lm_loss(model, texts, tokenizer, f.max_seq_len, dtype, device)


def run_cell(cfg: RunConfig, results_dir: Path) -> RunRecord:
    """Execute one cell and write its record (ok, failed or oom). Never raises for a failing run."""
    started, t0 = now_iso(), time.perf_counter()
    rec: dict[str, Any] = {}
    status, error = "ok", None
    try:
        _stages(cfg, results_dir, rec)
    except Pruned as err:  # a tuning trial its study stopped early: a result too, with its curve so far
        status, error = "pruned", str(err)
        rec["validation_curve"] = err.curve
    except Exception as err:  # a failing run is a result, not a crash of the suite
        status = "oom" if _is_oom(err) else "failed"
        tb = traceback.format_exc(limit=-3)
        error = f"{type(err).__name__}: {err}\n{tb}"
    record = make_record(cfg, status, error, started, time.perf_counter() - t0, peak_rss_bytes=peak_rss_bytes(), **rec)
    write_record(results_dir, record)
    _cards(record)
    return record


def _cards(record: RunRecord) -> None:
    """A model card in each exported folder (reports/card.py). Written after the record, from it alone; a card
    that cannot be written costs the card, never the run."""
    from reports.card import write_cards

    try:
        write_cards(record)
    except Exception as err:  # noqa: BLE001 - the artifacts and the record stand without their cards
        print(f"model cards not written: {error_text(err)}", flush=True)


def run_cell_file(cell_file: Path, results_dir: Path) -> int:
    """A cell process's whole job (``python -m harness _cell`` or a fork of the zygote): exit code 0 if ok."""
    from harness.libs import quiet_libraries

    quiet_libraries()
    # Every object the imports made (torch, transformers, peft: millions, most of them inherited from the zygote)
    # moves to the collector's permanent generation, so a full collection no longer walks them all. Without this,
    # building a task's 12k examples set off collections that took 0.3 s of every cell, and a fork's collections
    # wrote to pages it shares with the zygote (https://docs.python.org/3/library/gc.html#gc.freeze).
    gc.freeze()
    if os.environ.get("FTBENCH_THREADS"):  # --jobs N: the machine's cores split between the cells in flight
        torch.set_num_threads(int(os.environ["FTBENCH_THREADS"]))
    rec = run_cell(RunConfig.model_validate_json(Path(cell_file).read_text()), Path(results_dir))
    return 0 if rec.status == "ok" else 1
