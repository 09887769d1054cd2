"""The suite's types: leaf pydantic models that every other module may import (they import no ftbench module
but the optimizer names). Loading, validating and expanding a suite file is :mod:`harness.driver.suite`.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    Field,
    PositiveFloat,
    PositiveInt,
    field_validator,
    model_validator,
)

from harness.cell.optim import OPTIMIZERS
from harness.strict import AutoDtype, ConfigError, Strict, format_validation_error  # noqa: F401  (re-exported)

# Below this a cell process cannot even import torch, transformers and peft (measured on Linux x86-64: 900 MiB
# fails with MemoryError, 1200 MiB imports); above the upper bound the limit no longer fits setrlimit's 64 bits.
MIN_MEMORY_LIMIT_MB, MAX_MEMORY_LIMIT_MB = 1200, 2**30
MAX_GRAD_ACCUM = 1024  # micro-batches per step; every one is drawn before the step runs
DEVICE_PATTERN = r"^(cpu|cuda(:[0-9]{1,3})?)$"
Seed = Annotated[int, Field(ge=0, lt=2**63, description="a seed for torch and Python's random (0 ≤ seed < 2^63)")]


class TrainConfig(Strict):
    """Training settings shared by every method of a suite (a method entry may override any of them)."""

    steps: PositiveInt = Field(100, description="optimizer steps")
    batch_size: PositiveInt = Field(16, description="examples per micro-batch")
    grad_accum: PositiveInt = Field(1, le=MAX_GRAD_ACCUM, description="micro-batches per optimizer step")
    lr: PositiveFloat = Field(5e-5, allow_inf_nan=False, description="peak learning rate")
    weight_decay: float = Field(0.0, ge=0.0, allow_inf_nan=False)
    warmup_steps: int = Field(0, ge=0, description="linear LR warmup steps")
    schedule: Literal["linear", "cosine", "constant"] = "linear"
    max_grad_norm: PositiveFloat | None = Field(1.0, allow_inf_nan=False, description="clip grad norm; null: no clip")
    grad_checkpointing: bool = False
    dtype: Annotated[Literal["auto", "float32", "bfloat16", "float16"], AutoDtype()] = Field(
        "float32",
        description="compute dtype (bf16/fp16 = autocast; fp16 adds loss scaling); auto: bf16 where native, else fp32",
    )
    optimizer: str = Field("adamw", description=f"one of {', '.join(OPTIMIZERS)}")
    optimizer_args: dict[str, Any] = Field(default_factory=dict)
    max_seq_len: PositiveInt = 128
    group_by_length: bool = Field(
        False,
        description="batch training examples of similar length together (fewer pad tokens; as transformers' "
        "group_by_length), each batch still drawn at random from a window of 50 batches",
    )
    eval_batch_size: PositiveInt = 64
    timing_warmup_steps: int = Field(2, ge=0, description="first steps excluded from step-time statistics")
    eval_every: PositiveInt | None = Field(
        None, description="evaluate the validation split every N optimizer steps and after the last (null: never)"
    )
    val_examples: PositiveInt | None = Field(None, description="validation examples per evaluation (null: all)")
    select: Literal["last", "val_accuracy", "val_loss"] = Field(
        "last",
        description="the weights evaluated on the test split and exported: the last step's, or the step best on "
        "the validation split (needs eval_every)",
    )

    @field_validator("select")
    @classmethod
    def _select_needs_validation(cls, v: str, info) -> str:
        if v != "last" and info.data.get("eval_every") is None:
            raise ValueError(
                f"select: {v} picks a step by its validation score, so it needs eval_every (every N steps)"
            )
        return v

    @model_validator(mode="after")
    def _warmup_within_steps(self) -> TrainConfig:
        if self.warmup_steps > self.steps:
            raise ValueError(
                f"warmup_steps: {self.warmup_steps} is more than the {self.steps} steps (the learning rate would "
                f"never reach its peak); allowed: ≤ {self.steps}"
            )
        return self

    @field_validator("optimizer")
    @classmethod
    def _known_optimizer(cls, v: str) -> str:
        if v not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {v!r}; allowed: {', '.join(OPTIMIZERS)}")
        return v


class ModelSpec(Strict):
    """A model entry of a suite: its name and how to load it."""

    name: str = Field(description="alias (see `ftbench models`), local path, or hub id")
    trust_remote_code: bool = Field(
        False, description="run the model's own code (in the cell only; validation reads its config.json as data)"
    )
    allow_pickle: bool = Field(
        False, description="accept pickle weights (pytorch_model.bin), which run code when loaded; default: safetensors"
    )
    mode: Literal["auto", "classifier", "prompt"] = Field(
        "auto",
        description="auto: decoders (causal LMs) do every task through prompts, encoders through a classifier head",
    )
    init: Literal["pretrained", "random"] = Field(
        "pretrained",
        description="random: the architecture of a local folder's config.json with seeded random weights (memory "
        "and speed only: never scored). The *-shape aliases are always random",
    )


class Forgetting(Strict):
    """Language-modelling loss on held-out text of another task, before and after training (decoders)."""

    task: str = Field("bbc_news", description="a registered task whose test texts are the held-out text")
    examples: PositiveInt = 32
    max_seq_len: PositiveInt = 128


class Columns(Strict):
    """Which columns of a csv / jsonl / hf task hold what. The task's ``kind`` says which are needed:
    classification: text + label; multiple_choice: text + choices + label (the right choice, as its index or
    its text); generation: text + answer."""

    text: str = Field(description="the text (classification), the question (multiple choice), the prompt")
    label: str | None = Field(None, description="classification: the class; multiple choice: the right choice")
    text_pair: str | None = Field(None, description="a second text, e.g. the passage a question is about")
    group: str | None = Field(None, description="rows sharing this value stay in one split")
    choices: str | list[str] | None = Field(
        None, description="multiple choice: one column holding a list of choices, or a list of columns, one each"
    )
    answer: str | None = Field(None, description="generation: the reference answer (a number or a text)")


class TaskSpec(Strict):
    """A task entry of a suite: a registered task or your own data, with its sampling and prompt."""

    name: str = Field(description="a registered task, or csv / jsonl (with path) or hf (with dataset)")
    train_examples: PositiveInt | None = Field(None, description="subsample the train split")
    eval_examples: PositiveInt | None = Field(None, description="cap the test split used for evaluation")
    split_seed: int = 0
    path: str | None = Field(None, description="csv / jsonl: the file")
    dataset: str | None = Field(None, description="hf: a Hugging Face dataset name")
    columns: Columns | None = Field(None, description="csv / jsonl / hf: which columns hold what")
    kind: Literal["classification", "multiple_choice", "generation"] | None = Field(
        None, description="csv / jsonl / hf: what the rows are (default classification); registered tasks know"
    )
    prompt: str | None = Field(None, description="decoders: template over {text} and {text_pair} (default: task's)")
    label_words: list[str] | None = Field(None, description="decoders: the continuation scored for each label")
    max_new_tokens: PositiveInt = Field(16, description="generation tasks: tokens generated per answer")
    label: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$",
        description="the task's name in cell ids, records and reports (default: the registered name, the data "
        "file's stem, or the hub dataset)",
    )

    @property
    def display_name(self) -> str:
        """What tells this task apart from the suite's others everywhere it is shown (two csv files are two
        tasks): the label, else the data file's stem or the dataset, else the registered name."""
        if self.label:
            return self.label
        own = {"csv": Path(self.path or "").stem, "jsonl": Path(self.path or "").stem, "hf": self.dataset or ""}
        return re.sub(r"[^A-Za-z0-9_.-]+", "_", own.get(self.name) or "") or self.name

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
    """A method entry of a suite: the method, its variant, its config and its training overrides."""

    method: str = Field(
        description="a registered name (`ftbench methods`), or `file.py:Class` / `module:Class` beside the suite"
    )
    source: str | None = Field(None, description="set by ftbench: the file a `file.py:Class` method came from")
    variant: str = Field("default", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    config: dict[str, Any] = Field(default_factory=dict)
    train: dict[str, Any] = Field(default_factory=dict, description="overrides of the suite's train settings")


class SearchRange(Strict):
    """One hyperparameter's search space: a range (``log`` for a log-uniform one, ``integer`` for integers) or a
    list of ``choices``."""

    low: float | None = Field(None, allow_inf_nan=False)
    high: float | None = Field(None, allow_inf_nan=False)
    log: bool = False
    integer: bool = False
    choices: list[Any] | None = Field(None, min_length=1)

    @model_validator(mode="after")
    def _a_range_or_choices(self) -> SearchRange:
        if self.choices is not None:
            if self.low is not None or self.high is not None:
                raise ValueError("give either choices or low/high, not both")
            return self
        if self.low is None or self.high is None:
            raise ValueError("a range needs low and high (or give choices)")
        if not self.low < self.high:
            raise ValueError(f"empty or inverted range: low {self.low} must be below high {self.high}")
        if self.log and self.low <= 0:
            raise ValueError(f"a log range needs low > 0, got {self.low}")
        return self


TUNABLE_TRAIN = ("lr", "warmup_steps", "weight_decay", "max_grad_norm", "batch_size")
DEFAULT_SPACE = {"lr": {"low": 1e-5, "high": 1e-2, "log": True}}


STORAGE_DIALECTS = ("sqlite", "postgresql", "mysql", "oracle", "mssql")


def check_storage_url(url: str) -> str:
    """A database URL Optuna's RDBStorage can open (SQLAlchemy's form); the driver's presence is checked when
    the study opens."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    allowed = "sqlite:///PATH, postgresql://USER@HOST/DB, mysql://USER@HOST/DB"
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise ValueError(f"{url!r}: not a database URL; allowed: {allowed}") from None
    dialect = parsed.get_backend_name()
    if dialect == "sqlite" and parsed.database in (None, "", ":memory:"):
        raise ValueError(f"{url!r}: an in-memory database; each trial's process must reach it: sqlite:///PATH")
    if dialect not in STORAGE_DIALECTS:
        raise ValueError(f"{url!r}: unknown database {dialect!r}; allowed: {allowed}")
    return url


class Tune(Strict):
    """Every method at its own hyperparameters, chosen on the validation split with the same budget each."""

    trials: PositiveInt = Field(description="trials per method (the same budget for every method)")
    objective: Literal["val_accuracy", "val_loss"] = Field(
        "val_accuracy", description="a validation metric (maximised / minimised); the test split is never read"
    )
    sampler: Literal["tpe", "random", "grid"] = Field(
        "tpe", description="grid: `trials` points per range (log-spaced where log), every combination, in seeded order"
    )
    pruner: Literal["none", "median", "successive_halving", "hyperband"] = Field(
        "none", description="stop unpromising trials early, on their validation curve (every eval_every steps)"
    )
    seed: int = Field(0, ge=0, description="the sampler's seed")
    storage: str | None = Field(
        None,
        description="a database URL for the studies (sqlite:///PATH, postgresql://USER@HOST/DB, mysql://...), "
        "shared by many machines; default: a journal file in RESULTS/tuning/",
    )
    space: dict[str, dict[str, SearchRange]] = Field(
        default_factory=dict,
        description="per method name (or method/variant): {lr | warmup_steps | weight_decay | max_grad_norm | "
        "batch_size | config.<field>: range}; default: lr log-uniform in [1e-5, 1e-2]",
    )

    @field_validator("objective", mode="before")
    @classmethod
    def _never_the_test_split(cls, v: Any) -> Any:
        if isinstance(v, str) and v.startswith("test"):
            raise ValueError(f"{v}: tuning selects on the validation split; the test split is read once, at the end")
        return v

    @field_validator("storage")
    @classmethod
    def _database_url(cls, v: str | None) -> str | None:
        return None if v is None else check_storage_url(v)

    @field_validator("space")
    @classmethod
    def _known_fields(cls, v: dict) -> dict:
        for method, fields in v.items():
            for name in fields:
                if name not in TUNABLE_TRAIN and not name.startswith("config."):
                    allowed = ", ".join(TUNABLE_TRAIN)
                    raise ValueError(f"{method}.{name}: unknown; allowed: {allowed}, or config.<a method field>")
        return v


class Deploy(Strict):
    """What each exported artifact costs at deployment (harness/cell/deploy.py): load time, latency at batch 1, and
    the accuracy of each deployable form."""

    enabled: bool = Field(True, description="measure every export's deployable forms (needs export: true)")
    prompt_tokens: int = Field(64, ge=1, le=4096, description="decoders: the prompt prefilled at batch 1")
    new_tokens: int = Field(32, ge=1, le=1024, description="decoders: tokens decoded greedily with the KV cache")
    repeats: int = Field(3, ge=1, le=100, description="timed repeats after one warm-up")


class Suite(Strict):
    """A whole suite file: models × tasks × methods × seeds, and how they run."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    description: str = ""
    models: list[ModelSpec] = Field(min_length=1)
    tasks: list[TaskSpec] = Field(min_length=1)
    train: TrainConfig = TrainConfig()
    methods: list[MethodEntry] = Field(min_length=1)
    seeds: list[Seed] = Field([0], min_length=1)
    timeout_s: PositiveFloat = Field(3600, allow_inf_nan=False, description="per-run wall-clock limit")
    memory_limit_mb: int | None = Field(
        None,
        ge=MIN_MEMORY_LIMIT_MB,
        le=MAX_MEMORY_LIMIT_MB,
        description=f"per-run address-space limit (RLIMIT_AS); at least {MIN_MEMORY_LIMIT_MB} (torch's imports)",
    )
    num_cpus: PositiveInt = Field(1, description="Ray executor: CPUs reserved per cell")
    num_gpus: int = Field(0, ge=0, le=1, description="Ray executor: 1 for cells that need a GPU")
    retries: int = Field(0, ge=0, description="Ray executor: reruns of a cell whose worker crashed")
    allow_network: bool = Field(False, description="let runs reach the Hugging Face hub (default: offline)")
    export: bool = True
    deploy: Deploy = Field(default_factory=lambda: Deploy(), description="each export's deployment cost")
    forgetting: Forgetting | None = Field(None, description="decoders: LM loss on another task's text, before/after")
    tune: Tune | None = Field(None, description="`ftbench tune`: tune each method on the validation split first")
    device: str | None = Field(
        None, pattern=DEVICE_PATTERN, description="cpu | cuda | cuda:N (default: cuda where torch sees one, else cpu)"
    )

    @model_validator(mode="after")
    def _tuning_reads_a_validation_curve(self) -> Suite:
        if self.tune is not None and self.train.eval_every is None:
            raise ValueError("tune: the objective is read from the validation curve, so train.eval_every is needed")
        return self

    @field_validator("models", "tasks", mode="before")
    @classmethod
    def _names_as_specs(cls, v: Any) -> Any:
        return [{"name": x} if isinstance(x, str) else x for x in v] if isinstance(v, list) else v


RUN_SETTINGS = ("timeout_s", "retries", "num_cpus", "memory_limit_mb")  # how a cell runs, not part of its id


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
    model_fingerprint: str | None = Field(None, description="local model folders: SHA-256 of config + weight files")
    allow_network: bool = False
    export: bool = True
    deploy: Deploy = Field(default_factory=lambda: Deploy())
    num_cpus: int = 1
    num_gpus: int = 0
    retries: int = 0
    forgetting: Forgetting | None = None
    read_test: bool = Field(True, description="false for tuning trials: the test split is never read")
    trial: dict[str, Any] | None = Field(
        None, description="a tuning trial: {journal, study, number, objective, pruner} to report its curve to"
    )
    tuning: dict[str, Any] | None = Field(None, description="how this cell's hyperparameters were chosen")
    method_source: str | None = Field(None, description="`file.py:Class` methods: the file, absolute")
    device: str | None = Field(None, description="the suite's or --device's choice (None: cuda if present, else cpu)")

    @property
    def cell_id(self) -> str:
        """Readable identity plus a hash of the whole resolved config: changing any setting makes a new cell."""
        # how a cell is run (its time limit, retries, reserved CPUs, memory cap) is not what it measures: raising a
        # timeout must not rerun a suite. Fields added later count only when set, so older cells keep their ids.
        unset = {k for k in ("method_source", "device") if getattr(self, k) is None}
        fields = self.model_dump(mode="json", exclude=unset | set(RUN_SETTINGS))
        digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:10]
        model = self.model.name.rstrip("/").rsplit("/", 1)[-1] if "/" in self.model.name else self.model.name
        raw = f"{model}__{self.task.display_name}__{self.method}-{self.variant}__s{self.seed}"
        return re.sub(r"[^A-Za-z0-9_.-]+", "_", raw)[-120:] + "__" + digest
