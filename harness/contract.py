"""The two contracts of a cell: the *method* (what differs between two cells of a comparison) and the *task IO*
(how one kind of model reads a task). The training loop in :mod:`harness.cell.loop` drives both and branches on
neither; a new need widens a contract here rather than adding an ``if`` there.

A method transforms the model (freeze, inject adapters, quantize), says which parameters train, and exports
what it produced. It never owns the loop, but it may shape what the loop does through optional hooks:
parameter groups with their own options (LoRA+), an optimizer of its own, an extra loss term (a regulariser),
and a call after each optimizer step (AdaLoRA's rank allocation). :class:`MethodBase` gives every optional
hook its neutral default, so a minimal method is ``name``, ``prepare`` and ``trainable_parameters``
(``examples/head_only.py`` is one, whole).

Built-in methods live one per file in ``methods/`` and register with :func:`register_method`; third-party
packages register through the entry-point group ``ftbench.methods`` (:mod:`harness.registry` finds both).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:  # annotations only: the contract imports without torch (a suite's cheap checks use it)
    import torch

_NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,39}$")


@dataclass
class ModelContext:
    """What a method may need to know about the model it transforms (and nothing about the loop)."""

    task_type: str  # "seq_cls" (a classifier head) or "causal_lm" (a decoder scoring prompts)
    num_labels: int
    model_type: str  # transformers' config.model_type, e.g. "bert", "llama"
    # the head, trained in full by every method: modules named like a classifier head (classifier, score), and,
    # loaded from a checkpoint, each module it had no weights for (a path: DeBERTa's pooler.dense)
    head_names: list[str] = field(default_factory=list)
    output_names: list[str] = field(default_factory=list)  # a decoder's LM head: never quantized or adapted
    # calibration(n): model-input batches (CPU) of the first n training examples, for calibrated quantizers (GPTQ)
    calibration: Callable[[int], list[dict[str, torch.Tensor]]] | None = None
    train_steps: int = 0  # optimizer steps the run will take (schedules inside a method, e.g. AdaLoRA's budget)
    # the base model loaded again from its folder as the run first loaded it (None: random weights, no folder): for
    # a deployable form that puts the adapter back on the base a user would load (QLoRA's, on the unquantized one)
    load_base: Callable[[], torch.nn.Module] | None = None

    @property
    def peft_task_type(self) -> str:
        from peft import TaskType

        return TaskType.CAUSAL_LM if self.task_type == "causal_lm" else TaskType.SEQ_CLS


def within(path: str, names: set[str] | list[str]) -> bool:
    """Whether module ``path`` is one of ``names`` or inside one: a name is a module's last part, or its path,
    or the path of a module it is in (``classifier`` holds RoBERTa's ``classifier.dense``)."""
    parts = path.split(".")
    return parts[-1] in names or any(".".join(parts[:i]) in names for i in range(1, len(parts) + 1))


@dataclass
class Deployable:
    """One form in which an artifact is deployed, e.g. "bf16" for a merged model loaded in bfloat16, or "int4
    kernel" for an INT4 model run through torch's INT4 matmul. ``load`` reads it from disk, ready to run (the
    runner times it); where ftbench has no loader for the format, ``model`` is the in-memory equivalent and the
    load time is not measured (``note`` says why)."""

    name: str
    dtype: str = "float32"  # what its matmuls run in (a form in a dtype this machine emulates is not timed)
    load: Callable[[], torch.nn.Module] | None = None
    model: torch.nn.Module | None = None
    note: str = ""
    skipped: str = ""  # why this form cannot run for this artifact (e.g. a group size the kernel does not take)


@dataclass(frozen=True)
class MemoryModel:
    """What a method's memory is made of, for the analytic estimate at scale (harness/measure/estimate.py): every
    parameter trains in the weight dtype (``trains="all"``), or rank-``rank`` adapters train in fp32 on a frozen
    base whose linear weights take ``linear_bits`` each (None: the weight dtype), with adapter inputs pooled
    ``adapter_in_divisor`` at a time (QA-LoRA's groups)."""

    trains: Literal["all", "adapters"]
    rank: int = 0
    linear_bits: float | None = None
    adapter_in_divisor: int = 1
    targets: tuple[str, ...] | Literal["peft-default"] | None = None  # adapted linears; None: every one
    saves_linear_inputs: bool = True  # False where frozen matmuls keep no input for backward (QA-LoRA's)
    # False where the adapted linears recompute their weight in backward (QAT-LoRA's straight-through matmul), so
    # autocast's 16-bit copy of a float weight is not kept for backward (harness/measure/estimate.py)
    saves_weight_copies: bool = True


@dataclass
class Export:
    """One artifact a method wrote. ``model`` (optional) is the in-memory model the artifact represents
    (e.g. the merged model), so the runner can evaluate it and measure merge fidelity."""

    kind: str  # "full", "adapter", "merged", ...
    path: Path
    bytes_on_disk: int
    model: torch.nn.Module | None = None
    notes: str = ""
    unsupported: str = ""  # why this artifact could not be made (the method can't, e.g. a merge); nothing written
    error: str = ""  # it should have been made and failed (``Type: message``); the run stays ok
    format: str = ""  # a quantized artifact's format as served, e.g. "INT4 g32 RTN", "NF4 b64 DQ"; "": float
    deploy: list[Deployable] = field(default_factory=list)  # its deployable forms: load time, latency, accuracy


def error_text(err: BaseException) -> str:
    """``Type: first line`` of an exception, at most 300 characters: what a failed export's entry records."""
    first = str(err).splitlines()[0][:300] if str(err) else ""
    return f"{type(err).__name__}: {first}"


def attempt(kind: str, path: Path, make: Callable[[], Export]) -> Export:
    """``make()``, or, if it raises, an entry of ``kind`` that records the error: one artifact failing (a merge
    the base cannot take) leaves the method's other artifacts and the run standing."""
    try:
        return make()
    except Exception as err:  # noqa: BLE001 - recorded in the entry, never lost
        import shutil

        shutil.rmtree(path, ignore_errors=True)  # nothing half-written is left to be mistaken for the artifact
        return Export(kind, path, 0, error=error_text(err))


@runtime_checkable
class Method(Protocol):
    """Contract every fine-tuning method satisfies. ``Config`` is a pydantic model (unknown keys forbidden)
    whose fields are the method's options; ``ftbench methods`` lists them. A dtype field marked with
    :class:`harness.schema.AutoDtype` may be ``auto``: the harness resolves it for the run's machine before the
    method is built (and records the choice and why), so ``prepare`` sees a concrete dtype."""

    name: ClassVar[str]
    Config: ClassVar[type[BaseModel]]

    def __init__(self, config: BaseModel) -> None: ...

    def check_model(self, model: torch.nn.Module, ctx: ModelContext) -> None:
        """Raise ValueError if this config cannot apply to this architecture (given on the meta device, before
        any training, with the context ``prepare`` will get: e.g. a group size that does not divide a layer's
        d_in, the heads left out)."""

    def prepare(self, model: torch.nn.Module, ctx: ModelContext) -> torch.nn.Module:
        """Transform the model for training and return it (may wrap it, e.g. in a PeftModel)."""

    def trainable_parameters(self, model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
        """The (name, parameter) pairs the optimizer updates. Everything else must be frozen."""

    def param_groups(self, named: list[tuple[str, torch.nn.Parameter]], lr: float) -> list[dict[str, Any]]:
        """torch optimizer parameter groups over ``named`` (the trainable parameters), each a dict with
        ``params`` and any per-group option (``lr``, ``weight_decay``), plus a ``name`` the record keeps."""

    def optimizer(self, groups: list[dict[str, Any]], lr: float, weight_decay: float) -> torch.optim.Optimizer | None:
        """An optimizer of the method's own over ``groups``, or None for the suite's ``train.optimizer``."""

    def loss_term(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """A term added to the task's loss on each micro-batch (a regulariser), or None."""

    def on_step_end(self, model: torch.nn.Module, step: int) -> None:
        """Called after each optimizer and scheduler step, before the gradients are cleared (they are there
        to read, as AdaLoRA's importance scores do)."""

    def compute_dtype(self) -> str | None:
        """The dtype the method's own matmuls run in where it differs from training's (e.g. QLoRA dequantizing
        to bf16), concrete once ``auto`` is resolved; MFU is measured against that dtype's peak. None: none."""

    def export(self, model: torch.nn.Module, out_dir: Path) -> list[Export]:
        """Write the method's result (safetensors) under ``out_dir`` and describe each artifact."""

    def memory_model(self) -> MemoryModel | None:
        """How this method stores the base weights and what it trains, for ``ftbench estimate``'s peak-memory
        estimate at scale (harness/measure/estimate.py); None: the method is "not estimated"."""

    def report(self, model: torch.nn.Module) -> dict[str, Any]:
        """Figures the method measured about itself (e.g. bits per quantized parameter), stored in the record's
        ``method_metrics``. Called once, after training and export."""

    def positions_added(self) -> int:
        """Positions the method puts before every sequence that each layer then computes (prompt tuning's
        virtual tokens): the model FLOPs behind MFU count them. 0 (the default): the batch's own positions."""

    def trains_inputs(self) -> bool:
        """True where trainable parameters feed the body at its start or in every layer while the model registers
        them after it (prompt tuning's virtual tokens, prefix tuning's keys and values: peft's ``prompt_encoder``
        comes last): gradients then pass back through every layer, and the model FLOPs behind MFU count that
        backward. False (the default): the modules' order says which layers gradients pass through."""

    def starts_as_base(self) -> bool:
        """True where the prepared model computes exactly what the model it was given computes (full
        fine-tuning; LoRA, whose B starts at zero): its untrained score is then the base model's, so the cells
        of one suite with the same model, task, seed and evaluation settings evaluate it once and share it
        (the record says from which cell). False (the default) for anything that changes the weights or the
        function at the start: quantization, a non-zero adapter init."""


class NoOptions(BaseModel):
    """The Config of a method without options."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class MethodBase:
    """The neutral default of every optional hook of :class:`Method`; subclass it and write ``prepare`` and
    ``trainable_parameters``. (One level: a method shares code with another by calling functions, not by
    inheriting from it.)"""

    name: ClassVar[str]
    Config: ClassVar[type[BaseModel]] = NoOptions

    def __init__(self, config: BaseModel | None = None) -> None:
        self.config = config if config is not None else self.Config()

    def check_model(self, model: torch.nn.Module, ctx: ModelContext) -> None:
        return None

    def param_groups(self, named: list[tuple[str, torch.nn.Parameter]], lr: float) -> list[dict[str, Any]]:
        return [{"params": [p for _, p in named], "name": "all"}]

    def optimizer(self, groups: list[dict[str, Any]], lr: float, weight_decay: float) -> torch.optim.Optimizer | None:
        return None

    def loss_term(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
        return None

    def on_step_end(self, model: torch.nn.Module, step: int) -> None:
        return None

    def compute_dtype(self) -> str | None:
        return None

    def export(self, model: torch.nn.Module, out_dir: Path) -> list[Export]:
        """The trained parameters as one safetensors file (what a method without its own format produced)."""
        from safetensors.torch import save_file

        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / "trained.safetensors"
        save_file({n: p.detach().contiguous().cpu() for n, p in self.trainable_parameters(model)}, path)
        return [Export("trained", path, path.stat().st_size)]

    def memory_model(self) -> MemoryModel | None:
        return None

    def report(self, model: torch.nn.Module) -> dict[str, Any]:
        return {}

    def positions_added(self) -> int:
        return 0

    def trains_inputs(self) -> bool:
        return False

    def starts_as_base(self) -> bool:
        return False


REQUIRED = ("prepare", "trainable_parameters")
CONTRACT = (*REQUIRED, *(m for m in vars(MethodBase) if not m.startswith("_") and m not in ("Config", "name")))
_REGISTRY: dict[str, type] = {}
_ORIGIN: dict[str, str] = {}


class RegistryError(ValueError):
    """A method class that cannot be registered: a malformed or taken name, or a missing hook."""

    pass


def register_method(cls: type) -> type:
    """Class decorator: register a method under ``cls.name``. Rejects malformed and duplicate names and
    classes missing part of the contract, at import time, so a broken plug-in fails loudly and early."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise RegistryError(
            f"method class {cls.__qualname__} has malformed name {name!r}: use lowercase letters, digits and _, "
            "starting with a letter, at most 40 characters"
        )
    config = getattr(cls, "Config", None)
    if not (isinstance(config, type) and issubclass(config, BaseModel)):
        raise RegistryError(f"method {name!r}: Config must be a pydantic BaseModel subclass")
    missing = [m for m in CONTRACT if not callable(getattr(cls, m, None))]
    if missing:
        hint = " (subclass harness.contract.MethodBase for the defaults)" if set(missing) - set(REQUIRED) else ""
        raise RegistryError(f"method {name!r} lacks {', '.join(missing)} of the method contract{hint}")
    origin = f"{cls.__module__}.{cls.__qualname__}"
    if name in _REGISTRY and _ORIGIN[name] != origin:
        raise RegistryError(f"method name {name!r} is already registered by {_ORIGIN[name]}; {origin} cannot reuse it")
    _REGISTRY[name] = cls
    _ORIGIN[name] = origin
    return cls


class Batch(dict):
    """A training micro-batch: model inputs and ``labels`` (tensors), and ``head_positions``, the number of
    positions the output head computes on (a decoder's LM head runs on the answer's positions only; FLOPs
    count it there). 0 where the head is counted with the rest of the model (a classifier)."""

    head_positions: int = 0


@runtime_checkable
class TaskIO(Protocol):
    """How one kind of model reads a task — the mirror of :class:`Method`. Built from the task's examples and
    the model's tokenizer (it encodes them); :mod:`harness.tasks.classifier` has the classifier's,
    :mod:`harness.tasks.prompting` the decoder's (every task through prompts)."""

    task_type: ClassVar[str]  # ModelContext.task_type: "seq_cls" or "causal_lm"

    def output_names(self, model: torch.nn.Module) -> list[str]:
        """Modules that are the output head, run on a few positions only (FLOPs counted per position)."""

    def batches(self, batch_size: int, seed: int, group_by_length: bool = False) -> Iterator[Batch]:
        """Endless stream of shuffled training batches (each epoch reshuffled from ``seed``); with
        ``group_by_length``, examples of similar length batched together (fewer pad tokens computed)."""

    def objective(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The task's training loss on a batch."""

    def evaluate(
        self, model: torch.nn.Module, batch_size: int, dtype: torch.dtype, device: torch.device, split: str = "test"
    ) -> tuple[dict[str, Any], torch.Tensor]:
        """Metrics on the ``split`` examples ("test" or "validation"), and the per-example scores behind them
        (export fidelity compares them)."""

    def calibration(self, n: int) -> list[dict[str, torch.Tensor]]:
        """Model-input batches of the first ``n`` training examples, as training sees them."""

    # Optional (the cell reads it where a TaskIO has it): ``input_lengths() -> {"train": {...}, "test": {...}}``,
    # each split's :func:`harness.tasks.data.input_lengths`: how many inputs were cut to max_seq_len.


class Pruned(Exception):
    """The study's pruner stopped this trial at ``step``; ``curve`` is its validation curve up to there."""

    def __init__(self, message: str, step: int, curve: list[dict]) -> None:
        super().__init__(message)
        self.step, self.curve = step, curve
