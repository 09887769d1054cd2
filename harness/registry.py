"""The method contract and the method registry.

A *method* is the only thing that differs between two cells of a comparison. It transforms the model
(freeze, inject adapters, quantize), says which parameters train, and exports what it produced. It never
owns the training loop: the loop in :mod:`harness.loop` is shared by every method and has no
method-specific branches. When a method needs to act inside the loop, it does so through the hooks of
this contract (``on_step_end``), and a new need widens this contract rather than adding an ``if`` there.

Built-in methods live one per file in ``methods/`` and register with :func:`register_method`.
Third-party packages register through the entry-point group ``ftbench.methods``::

    [project.entry-points."ftbench.methods"]
    my_method = "my_pkg.my_method:MyMethod"
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from pydantic import BaseModel

ENTRY_POINT_GROUP = "ftbench.methods"
_NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,39}$")


@dataclass
class ModelContext:
    """What a method may need to know about the model it transforms (and nothing about the loop)."""

    task_type: str  # "seq_cls" (a classifier head) or "causal_lm" (a decoder scoring prompts)
    num_labels: int
    model_type: str  # transformers' config.model_type, e.g. "bert", "llama"
    head_names: list[str] = field(default_factory=list)  # classifier modules that must stay trainable
    output_names: list[str] = field(default_factory=list)  # a decoder's LM head: never quantized or adapted
    # calibration(n): model-input batches (CPU) of the first n training examples, for calibrated quantizers (GPTQ)
    calibration: Callable[[int], list[dict[str, torch.Tensor]]] | None = None

    @property
    def peft_task_type(self) -> str:
        from peft import TaskType

        return TaskType.CAUSAL_LM if self.task_type == "causal_lm" else TaskType.SEQ_CLS


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


@runtime_checkable
class Method(Protocol):
    """Contract every fine-tuning method satisfies. ``Config`` is a pydantic model (unknown keys forbidden)
    whose fields are the method's options; ``ftbench methods`` lists them. A dtype field marked with
    :class:`harness.hardware.AutoDtype` may be ``auto``: the harness resolves it for the run's machine before the
    method is built (and records the choice and why), so ``prepare`` sees a concrete dtype."""

    name: ClassVar[str]
    Config: ClassVar[type[BaseModel]]

    def __init__(self, config: BaseModel) -> None: ...

    def check_model(self, model: torch.nn.Module) -> None:
        """Raise ValueError if this config cannot apply to this architecture (given on the meta device, before
        any training: e.g. a group size that does not divide a layer's d_in). Most methods accept any model."""
        ...

    def prepare(self, model: torch.nn.Module, ctx: ModelContext) -> torch.nn.Module:
        """Transform the model for training and return it (may wrap it, e.g. in a PeftModel)."""
        ...

    def trainable_parameters(self, model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
        """The (name, parameter) pairs the optimizer updates. Everything else must be frozen."""
        ...

    def on_step_end(self, model: torch.nn.Module, step: int) -> None:
        """Called by the loop after each optimizer step. Most methods do nothing."""
        ...

    def export(self, model: torch.nn.Module, out_dir: Path) -> list[Export]:
        """Write the method's result (safetensors) under ``out_dir`` and describe each artifact."""
        ...

    def report(self, model: torch.nn.Module) -> dict[str, Any]:
        """Figures the method measured about itself (e.g. bits per quantized parameter), stored in the record's
        ``method_metrics``. Called once, after training and export. Most methods return ``{}``."""
        ...


CONTRACT = ("check_model", "prepare", "trainable_parameters", "on_step_end", "export", "report")
_REGISTRY: dict[str, type] = {}
_ORIGIN: dict[str, str] = {}


class RegistryError(ValueError):
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
        raise RegistryError(f"method {name!r} lacks {', '.join(missing)} of the method contract")
    origin = f"{cls.__module__}.{cls.__qualname__}"
    if name in _REGISTRY and _ORIGIN[name] != origin:
        raise RegistryError(f"method name {name!r} is already registered by {_ORIGIN[name]}; {origin} cannot reuse it")
    _REGISTRY[name] = cls
    _ORIGIN[name] = origin
    return cls


_loaded = False


def _load_all() -> None:
    """Import the built-in methods and the entry-point plug-ins once."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    import methods  # noqa: F401  (importing registers the built-ins)

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        cls = ep.load()
        if getattr(cls, "name", None) != ep.name:
            raise RegistryError(
                f"entry point {ep.name!r} ({ep.value}) loads a method named {getattr(cls, 'name', None)!r}"
            )
        if ep.name not in _REGISTRY:
            register_method(cls)


def available_methods() -> dict[str, type]:
    _load_all()
    return dict(sorted(_REGISTRY.items()))


def get_method(name: str) -> type:
    methods_ = available_methods()
    if name not in methods_:
        raise KeyError(name)
    return methods_[name]


def describe_config(config: type[BaseModel]) -> list[dict[str, Any]]:
    """Fields of a method config as (name, type, default, description) rows for ``ftbench methods``."""
    from typing import get_origin

    rows = []
    for fname, f in config.model_fields.items():
        ann = f.annotation
        plain = isinstance(ann, type) and get_origin(ann) is None
        tname = ann.__name__ if plain else str(ann).replace("typing.", "")
        default = "required" if f.is_required() else repr(f.get_default(call_default_factory=True))
        rows.append({"field": fname, "type": tname, "default": default, "help": f.description or ""})
    if config.model_config.get("extra") == "allow":
        rows.append(
            {
                "field": "…",
                "type": "",
                "default": "",
                "help": "any other field of the underlying peft config, by name (e.g. use_dora, use_rslora)",
            }
        )
    return rows
