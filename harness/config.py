"""Typed, validated suite configuration.

A suite YAML names models, tasks, shared training settings, methods (with named variants and their own
config) and seeds. :func:`load_suite` validates everything — including each method's own config against
that method's ``Config`` model — before anything trains, and turns every problem into a one-line
:class:`ConfigError` naming the file, the field, the value and what is allowed.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt, ValidationError, field_validator

from harness.hardware import AutoDtype
from harness.optim import OPTIMIZERS


class ConfigError(Exception):
    """A user error in a suite or on the command line: shown as one line, exit code 2, no traceback."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TrainConfig(Strict):
    """Training settings shared by every method of a suite (a method entry may override any of them)."""

    steps: PositiveInt = Field(100, description="optimizer steps")
    batch_size: PositiveInt = Field(16, description="examples per micro-batch")
    grad_accum: PositiveInt = Field(1, description="micro-batches per optimizer step")
    lr: PositiveFloat = Field(5e-5, description="peak learning rate")
    weight_decay: float = Field(0.0, ge=0.0)
    warmup_steps: int = Field(0, ge=0, description="linear LR warmup steps")
    schedule: Literal["linear", "cosine", "constant"] = "linear"
    max_grad_norm: PositiveFloat | None = Field(1.0, description="clip total grad norm; null disables")
    grad_checkpointing: bool = False
    dtype: Annotated[Literal["auto", "float32", "bfloat16"], AutoDtype()] = Field(
        "float32", description="compute dtype (bf16 = autocast); auto: bf16 only where this machine runs it natively"
    )
    optimizer: str = Field("adamw", description=f"one of {', '.join(OPTIMIZERS)}")
    optimizer_args: dict[str, Any] = Field(default_factory=dict)
    max_seq_len: PositiveInt = 128
    eval_batch_size: PositiveInt = 64
    timing_warmup_steps: int = Field(2, ge=0, description="first steps excluded from step-time statistics")

    @field_validator("optimizer")
    @classmethod
    def _known_optimizer(cls, v: str) -> str:
        if v not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {v!r}; allowed: {', '.join(OPTIMIZERS)}")
        return v


class ModelSpec(Strict):
    name: str = Field(description="alias (see `ftbench models`), local path, or hub id")
    trust_remote_code: bool = False
    mode: Literal["auto", "classifier", "prompt"] = Field(
        "auto",
        description="auto: decoders (causal LMs) do every task through prompts, encoders through a classifier head",
    )


class Forgetting(Strict):
    """Language-modelling loss on held-out text of another task, before and after training (decoders)."""

    task: str = Field("bbc_news", description="a registered task whose test texts are the held-out text")
    examples: PositiveInt = 32
    max_seq_len: PositiveInt = 128


class Columns(Strict):
    text: str
    label: str
    text_pair: str | None = None
    group: str | None = Field(None, description="rows sharing this value stay in one split")


class TaskSpec(Strict):
    name: str = Field(description="a registered task, or csv / jsonl (with path) or hf (with dataset)")
    train_examples: PositiveInt | None = Field(None, description="subsample the train split")
    eval_examples: PositiveInt | None = Field(None, description="cap the test split used for evaluation")
    split_seed: int = 0
    path: str | None = Field(None, description="csv / jsonl: the file")
    dataset: str | None = Field(None, description="hf: a Hugging Face dataset name")
    columns: Columns | None = Field(None, description="csv / jsonl / hf: which columns hold text and label")
    prompt: str | None = Field(None, description="decoders: template over {text} and {text_pair} (default: task's)")
    label_words: list[str] | None = Field(None, description="decoders: the continuation scored for each label")
    max_new_tokens: PositiveInt = Field(16, description="generation tasks: tokens generated per answer")

    @field_validator("prompt")
    @classmethod
    def _template(cls, v: str | None) -> str | None:
        if v is None:
            return v
        fields = set(re.findall(r"{(\w*)}", v))
        if "text" not in fields or fields - {"text", "text_pair"}:
            raise ValueError("a prompt template uses {text} (required) and {text_pair}, no other fields")
        return v


class MethodEntry(Strict):
    method: str
    variant: str = Field("default", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    config: dict[str, Any] = Field(default_factory=dict)
    train: dict[str, Any] = Field(default_factory=dict, description="overrides of the suite's train settings")


class Suite(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    description: str = ""
    models: list[ModelSpec] = Field(min_length=1)
    tasks: list[TaskSpec] = Field(min_length=1)
    train: TrainConfig = TrainConfig()
    methods: list[MethodEntry] = Field(min_length=1)
    seeds: list[int] = Field([0], min_length=1)
    timeout_s: PositiveFloat = Field(3600, description="per-run wall-clock limit")
    memory_limit_mb: PositiveInt | None = Field(None, description="per-run address-space limit (RLIMIT_AS)")
    num_cpus: PositiveInt = Field(1, description="Ray executor: CPUs reserved per cell")
    num_gpus: int = Field(0, ge=0, le=1, description="Ray executor: 1 for cells that need a GPU")
    retries: int = Field(0, ge=0, description="Ray executor: reruns of a cell whose worker crashed")
    allow_network: bool = Field(False, description="let runs reach the Hugging Face hub (default: offline)")
    export: bool = True
    forgetting: Forgetting | None = Field(None, description="decoders: LM loss on another task's text, before/after")

    @field_validator("models", "tasks", mode="before")
    @classmethod
    def _names_as_specs(cls, v: Any) -> Any:
        return [{"name": x} if isinstance(x, str) else x for x in v] if isinstance(v, list) else v


class RunConfig(Strict):
    """One cell of the suite grid, fully resolved: everything a run needs, and what its record stores."""

    suite: str
    model: ModelSpec
    task: TaskSpec
    method: str
    variant: str
    method_config: dict[str, Any]
    train: TrainConfig
    seed: int
    timeout_s: float
    memory_limit_mb: int | None = None
    allow_network: bool = False
    export: bool = True
    num_cpus: int = 1
    num_gpus: int = 0
    retries: int = 0
    forgetting: Forgetting | None = None

    @property
    def cell_id(self) -> str:
        """Readable identity plus a hash of the whole resolved config: changing any setting makes a new cell."""
        digest = hashlib.sha256(json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()[:10]
        raw = f"{self.model.name}__{self.task.name}__{self.method}-{self.variant}__s{self.seed}"
        return re.sub(r"[^A-Za-z0-9_.-]+", "_", raw)[-120:] + "__" + digest


def _loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _allowed_fields(model: type[BaseModel], loc: tuple) -> list[str] | None:
    """Walk ``model`` along ``loc`` (minus the offending key) to list the keys allowed there."""
    cur: Any = model
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        if not (isinstance(cur, type) and issubclass(cur, BaseModel)) or part not in cur.model_fields:
            return None
        ann = cur.model_fields[part].annotation
        args = getattr(ann, "__args__", ())
        cur = next((a for a in (ann, *args) if isinstance(a, type) and issubclass(a, BaseModel)), ann)
    if isinstance(cur, type) and issubclass(cur, BaseModel):
        return list(cur.model_fields)
    return None


def format_validation_error(source: str, err: ValidationError, model: type[BaseModel], prefix: tuple = ()) -> str:
    """First error of a pydantic ValidationError as one line: file: field: value — what is allowed."""
    # A typo'd key is the likeliest root cause of the other errors (e.g. "modelz" → "models missing"): show it first.
    e = sorted(err.errors(include_url=False), key=lambda x: x["type"] != "extra_forbidden")[0]
    loc = prefix + tuple(e["loc"])
    where = _loc(loc) or "(top level)"
    if e["type"] == "extra_forbidden":
        allowed = _allowed_fields(model, tuple(e["loc"]))
        hint = f"; allowed keys: {', '.join(allowed)}" if allowed else ""
        return f"{source}: {where}: unknown key{hint}"
    msg = e["msg"].removeprefix("Value error, ")
    if e["type"] == "missing":
        return f"{source}: {where}: required field is missing"
    got = e.get("input")
    return f"{source}: {where}: {msg}" + ("" if isinstance(got, (dict, list)) else f" (got {got!r})")


def parse_suite(data: Any, source: str) -> Suite:
    if data is None:
        raise ConfigError(f"{source}: the file is empty; a suite needs name, models, tasks and methods")
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: top level must be a mapping (name:, models:, ...), got a {type(data).__name__}")
    try:
        suite = Suite.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(source, err, Suite)) from None
    _check_names(suite, source)
    return suite


def _check_names(suite: Suite, source: str) -> None:
    """Resolve method names and validate each method's own config against its Config model."""
    from harness.registry import available_methods

    known = available_methods()
    seen: set[tuple[str, str]] = set()
    for i, m in enumerate(suite.methods):
        where = f"{source}: methods[{i}]"
        if "config_file" in m.config:
            m = suite.methods[i] = m.model_copy(update={"config": _with_config_file(m.config, source, where)})
        if m.method not in known:
            raise ConfigError(f"{where}.method: unknown method {m.method!r}; allowed: {', '.join(known)}")
        if (m.method, m.variant) in seen:
            raise ConfigError(
                f"{where}: duplicate cell identity {m.method}/{m.variant}; give each entry a distinct variant"
            )
        seen.add((m.method, m.variant))
        try:
            known[m.method].Config.model_validate(m.config)
        except ValidationError as err:
            raise ConfigError(
                format_validation_error(source, err, known[m.method].Config, ("methods", i, "config"))
            ) from None
        try:
            TrainConfig.model_validate({**suite.train.model_dump(), **m.train})
        except ValidationError as err:
            raise ConfigError(format_validation_error(source, err, TrainConfig, ("methods", i, "train"))) from None
    from harness.models import check_model_name
    from harness.tasks import check_task_name, check_task_spec

    for i, spec in enumerate(suite.models):
        check_model_name(spec.name, f"{source}: models[{i}].name", suite.allow_network)
    for i, t in enumerate(suite.tasks):
        check_task_name(t.name, f"{source}: tasks[{i}].name")
        check_task_spec(t, f"{source}: tasks[{i}]", suite.allow_network)
    if len(set(suite.seeds)) != len(suite.seeds):
        raise ConfigError(f"{source}: seeds: duplicate seed in {suite.seeds}")
    _check_tasks_fit_models(suite, source)
    _check_methods_fit_models(suite, source, known)


def _with_config_file(config: dict[str, Any], source: str, where: str) -> dict[str, Any]:
    """``config_file: path/adapter_config.json`` (relative to the suite file): the file's keys, then the suite's
    own keys over them. The record's config holds the merged result, so the file is not needed to read it."""
    rest = {k: v for k, v in config.items() if k != "config_file"}
    name = config["config_file"]
    if not isinstance(name, str):
        raise ConfigError(f"{where}.config.config_file: a path to a JSON file (got {name!r})")
    suite_path = Path(source)
    path = Path(name).expanduser()
    path = path if path.is_absolute() or not suite_path.is_file() else suite_path.parent / path
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{where}.config.config_file: cannot read {path}: {err.__class__.__name__}") from None
    except json.JSONDecodeError as err:
        raise ConfigError(
            f"{where}.config.config_file: {path} is not valid JSON ({err.msg}, line {err.lineno})"
        ) from None
    if not isinstance(data, dict):
        raise ConfigError(f"{where}.config.config_file: {path} must hold a JSON object")
    return {**data, **rest}


def _check_tasks_fit_models(suite: Suite, source: str) -> None:
    """Multiple-choice and generation tasks (and the forgetting measure) need a model that reads prompts."""
    from harness.models import resolve_mode
    from harness.tasks import TASKS, task_kind

    if suite.forgetting and suite.forgetting.task not in TASKS:
        raise ConfigError(
            f"{source}: forgetting.task: unknown task {suite.forgetting.task!r}; allowed: {', '.join(sorted(TASKS))}"
        )
    for i, spec in enumerate(suite.models):
        if resolve_mode(spec.name, spec.mode, spec.trust_remote_code) != "classifier":
            continue
        for j, t in enumerate(suite.tasks):
            if task_kind(t.name) != "classification":
                raise ConfigError(
                    f"{source}: tasks[{j}]: {t.name} is a {task_kind(t.name)} task, scored through prompts; "
                    f"models[{i}] ({spec.name}) uses a classification head: use a decoder or `mode: prompt`"
                )
        if suite.forgetting:
            raise ConfigError(
                f"{source}: forgetting: measures a language model's loss; models[{i}] ({spec.name}) uses a "
                "classification head: use a decoder or `mode: prompt`"
            )


def _check_methods_fit_models(suite: Suite, source: str, known: dict) -> None:
    """Each method checks its config against each model's architecture (built on the meta device: no weights,
    no memory), so e.g. a QA-LoRA group size that does not divide a layer's d_in fails before any training."""
    from harness.models import resolve_mode, skeleton

    for spec in suite.models:
        mode = resolve_mode(spec.name, spec.mode, spec.trust_remote_code) or "classifier"
        model = skeleton(spec.name, spec.trust_remote_code, mode)
        if model is None:  # architecture unknown without the network; the run will say
            continue
        for i, m in enumerate(suite.methods):
            method = known[m.method](known[m.method].Config.model_validate(m.config))
            try:
                method.check_model(model)
            except ValueError as err:
                field = getattr(err, "field", "")  # methods.common.FieldError names the field at fault
                where = f"methods[{i}].config" + (f".{field}" if field else "")
                raise ConfigError(
                    f"{source}: {where}: {err} (model {spec.name}, method {m.method}/{m.variant})"
                ) from None


def load_suite(path: str | Path) -> Suite:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such suite file")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{path}: malformed YAML{where}: {problem}") from None
    return parse_suite(data, str(path))


def expand(suite: Suite) -> list[RunConfig]:
    """The suite grid: models × tasks × methods (variants) × seeds, in a stable order."""
    cells = []
    for model in suite.models:
        for task in suite.tasks:
            for m in suite.methods:
                from harness.registry import get_method

                cfg = get_method(m.method).Config.model_validate(m.config).model_dump(mode="json")
                train = TrainConfig.model_validate({**suite.train.model_dump(), **m.train})
                for seed in suite.seeds:
                    cells.append(
                        RunConfig(
                            suite=suite.name,
                            model=model,
                            task=task,
                            method=m.method,
                            variant=m.variant,
                            method_config=cfg,
                            train=train,
                            seed=seed,
                            timeout_s=suite.timeout_s,
                            memory_limit_mb=suite.memory_limit_mb,
                            allow_network=suite.allow_network,
                            num_cpus=suite.num_cpus,
                            num_gpus=suite.num_gpus,
                            retries=suite.retries,
                            export=suite.export,
                            forgetting=suite.forgetting,
                        )
                    )
    return cells
