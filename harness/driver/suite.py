"""Suite files: load, validate, expand.

A suite YAML names models, tasks, shared training settings, methods (with named variants and their own
config) and seeds. :func:`load_suite` validates everything — including each method's own config against
that method's ``Config`` model, and each method against each model's architecture — before anything trains,
and turns every problem into a one-line :class:`ConfigError` naming the file, the field, the value and what
is allowed. :func:`expand` turns a suite into its grid of cells (:class:`RunConfig`).

Validation has two phases. :func:`check_cheap` needs neither torch nor transformers: the schema, every name,
each method's config (peft-backed configs import peft to check the fields they pass to it) and each task's
data, so a typo is reported in about a second. :func:`check_fit` then builds optimizers and each model's
skeleton (on the meta device) to check what only an architecture can say: target modules, ranks, group sizes;
``ftbench run`` runs it in a fork of the cells' zygote, which has torch imported (harness/driver/torchside.py).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from harness.cell.modelnames import ALIASES, check_model_name, fingerprint
from harness.registry import available_methods, broken_plugins, get_method, load_method_file, registered_names
from harness.schema import ConfigError, ModelSpec, RunConfig, Suite, TaskSpec, TrainConfig, format_validation_error
from harness.tasks.builtin import TASKS, check_task_name, load_task, task_kind
from harness.tasks.userdata import check_task_spec, read_user_text

MAX_SUITE_BYTES = 2**20


def parse_suite(data: Any, source: str) -> Suite:
    """The suite in ``data`` (read from ``source``), validated in full: both phases."""
    suite = check_cheap(data, source)
    check_fit(suite, source)
    return suite


def check_cheap(data: Any, source: str) -> Suite:
    """Every check that needs no torch: schema, names, method configs, task data, tuning spaces."""
    if data is None:
        raise ConfigError(f"{source}: the file is empty; a suite needs name, models, tasks and methods")
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: top level must be a mapping (name:, models:, ...), got a {type(data).__name__}")
    try:
        suite = Suite.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(source, err, Suite)) from None
    suite = _paths_from_the_suite_file(suite, source)
    _check_names(suite, source)
    _check_tune(suite, source)
    if len(set(suite.seeds)) != len(suite.seeds):
        raise ConfigError(f"{source}: seeds: duplicate seed in {suite.seeds}")
    if suite.forgetting and suite.forgetting.task not in TASKS:
        raise ConfigError(
            f"{source}: forgetting.task: unknown task {suite.forgetting.task!r}; allowed: {', '.join(sorted(TASKS))}"
        )
    return suite


def check_fit(suite: Suite, source: str) -> None:
    """The checks that need torch: each optimizer built once, each model's skeleton against each task and
    method."""
    _check_optimizers(suite, source)
    _check_tasks_fit_models(suite, source)
    _check_methods_fit_models(suite, source, available_methods())


def check_fit_sent(suite_json: str, source: str) -> None:
    """:func:`check_fit` on a suite sent as JSON (to a fork of the cells' zygote: harness/driver/torchside.py).
    Methods from files beside the suite are registered in that process first, as a cell does."""
    suite = Suite.model_validate_json(suite_json)
    for m in suite.methods:
        if m.source:
            load_method_file(m.source)
    check_fit(suite, source)


def _beside(source: str, name: str) -> str:
    """``name`` as a path relative to the suite file's folder (absolute and ``~`` paths as they are). A suite
    given as data rather than a file resolves from the current directory."""
    path = Path(name).expanduser()
    suite_path = Path(source)
    return str(path if path.is_absolute() or not suite_path.is_file() else (suite_path.parent / path).absolute())


def _paths_from_the_suite_file(suite: Suite, source: str) -> Suite:
    """Data files' ``path:`` resolved like ``config_file:``, from the suite file, so a suite runs the same
    from any directory; the resolved path is what cells and records see."""
    tasks = [t.model_copy(update={"path": _beside(source, t.path)}) if t.path else t for t in suite.tasks]
    return suite.model_copy(update={"tasks": tasks})


def _check_tune(suite: Suite, source: str) -> None:
    """Each space names a method of the suite, and each tuned ``config.<field>`` is a field that method's config
    accepts (its own validation, on every choice and on both ends of a range): a value the method refuses would
    otherwise be a failed trial, found only when the study proposes it."""
    if suite.tune is None:
        return
    known = available_methods()
    entries = {m.method: m for m in suite.methods} | {f"{m.method}/{m.variant}": m for m in suite.methods}
    for name, fields in suite.tune.space.items():
        if name not in entries:
            raise ConfigError(
                f"{source}: tune.space.{name}: no such method in this suite; methods: {', '.join(sorted(entries))}"
            )
        entry = entries[name]
        for key, r in fields.items():
            if not key.startswith("config."):
                continue
            ends = [r.low, r.high] if r.choices is None else []
            for value in r.choices if r.choices is not None else [int(x) if r.integer else x for x in ends]:
                try:
                    known[entry.method].Config.model_validate({**entry.config, key.removeprefix("config."): value})
                except ValidationError as err:
                    first = err.errors()[0]  # about this value (its field), or about the key itself (unknown)
                    why = f"{value!r}: {first['msg']}" if key.removeprefix("config.") in first["loc"] else first["msg"]
                    raise ConfigError(f"{source}: tune.space.{name}.{key}: {why} (method {entry.method})") from None


def _check_names(suite: Suite, source: str) -> None:
    """Resolve method names and validate each method's own config against its Config model."""
    known = available_methods()
    seen: set[tuple[str, str]] = set()
    files: dict[str, str] = {}  # a method name from a file -> that file: two files may not share a name
    for i, m in enumerate(suite.methods):
        where = f"{source}: methods[{i}]"
        if "config_file" in m.config:
            m = suite.methods[i] = m.model_copy(update={"config": _with_config_file(m.config, source, where)})
        if m.source is not None and ":" not in m.method:
            raise ConfigError(f"{where}.source: set by ftbench; name a method's file as method: file.py:Class")
        if ":" in m.method:  # a method from a file beside the suite, no packaging needed
            try:
                cls, spec = load_method_file(m.method, Path(_beside(source, ".")))
            except ValueError as err:
                raise ConfigError(f"{where}.method: {err}") from None
            if files.setdefault(cls.name, spec) != spec:
                raise ConfigError(f"{where}.method: {m.method!r} is named {cls.name!r}, like {files[cls.name]}")
            m = suite.methods[i] = m.model_copy(update={"method": cls.name, "source": spec})
            known = available_methods()
        if m.method in broken_plugins():
            raise ConfigError(f"{where}.method: {m.method!r}: {broken_plugins()[m.method]}")
        if m.method not in known:
            allowed = ", ".join(registered_names())
            raise ConfigError(f"{where}.method: unknown method {m.method!r}; allowed: {allowed}, or file.py:Class")
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
    models: dict[str, int] = {}
    for i, spec in enumerate(suite.models):
        where = f"{source}: models[{i}].name"
        check_model_name(spec.name, where, suite.allow_network, spec.allow_pickle, spec.init)
        same = _resolved(spec)[0].model_dump_json()  # `./m` and its absolute path are one model
        if same in models:  # its cells would share ids: run twice, one record overwriting the other
            raise ConfigError(f"{source}: models[{i}]: the same model as models[{models[same]}] ({spec.name})")
        models[same] = i
    shown: dict[str, int] = {}
    for i, t in enumerate(suite.tasks):
        check_task_name(t.name, f"{source}: tasks[{i}].name")
        if t.display_name in shown:
            raise ConfigError(
                f"{source}: tasks[{i}]: shown as {t.display_name!r}, like tasks[{shown[t.display_name]}]; give one "
                "a distinct label: (its name in cell ids, records and reports)"
            )
        shown[t.display_name] = i
        check_task_spec(t, f"{source}: tasks[{i}]", suite.allow_network)
        if t.name != "hf":  # read the data now: a bad row, an empty split or a batch larger than one fails here
            try:
                n_train, n_val, n_test = _split_sizes(t.model_dump_json())
            except ConfigError as err:
                raise ConfigError(f"{source}: tasks[{i}]: {err}") from None
            if not (n_val and n_test):
                raise ConfigError(
                    f"{source}: tasks[{i}] ({t.display_name}): the split gives {n_train} training, {n_val} validation "
                    f"and {n_test} test examples; every split needs at least one (rows with the same text, or the "
                    "same group, stay in one split: give more distinct rows)"
                )
            for j, m in enumerate(suite.methods):
                batch = m.train.get("batch_size", suite.train.batch_size)
                if isinstance(batch, int) and batch > n_train:
                    where = f"methods[{j}].train.batch_size" if "batch_size" in m.train else "train.batch_size"
                    raise ConfigError(
                        f"{source}: {where}: {batch} is more than the {n_train} training examples of tasks[{i}] "
                        f"({t.name}); allowed: ≤ {n_train}"
                    )


@functools.lru_cache(maxsize=64)
def _split_sizes(spec_json: str) -> tuple[int, int, int]:
    """Training, validation and test examples of a task spec (loaded once per process: tests validate often)."""
    data = load_task(TaskSpec.model_validate_json(spec_json))
    return len(data.train), len(data.validation), len(data.test)


def _check_optimizers(suite: Suite, source: str) -> None:
    """Each optimizer is built once on a one-element parameter, so unknown ``optimizer_args`` fail here."""
    import torch

    from harness.cell.optim import build_optimizer

    for where, values in [("train", {})] + [(f"methods[{i}].train", m.train) for i, m in enumerate(suite.methods)]:
        t = TrainConfig.model_validate({**suite.train.model_dump(), **values})
        if where != "train" and not ({"optimizer", "optimizer_args"} & set(values)):
            continue
        try:
            build_optimizer(t.optimizer, [torch.nn.Parameter(torch.zeros(1))], t.lr, t.weight_decay, t.optimizer_args)
        except (TypeError, ValueError) as err:
            why = str(err).splitlines()[0]
            raise ConfigError(
                f"{source}: {where}.optimizer_args: {t.optimizer} rejects {t.optimizer_args}: {why}"
            ) from None


def _with_config_file(config: dict[str, Any], source: str, where: str) -> dict[str, Any]:
    """``config_file: path/adapter_config.json`` (relative to the suite file): the file's keys, then the suite's
    own keys over them. The record's config holds the merged result, so the file is not needed to read it."""
    rest = {k: v for k, v in config.items() if k != "config_file"}
    name = config["config_file"]
    if not isinstance(name, str):
        raise ConfigError(f"{where}.config.config_file: a path to a JSON file (got {name!r})")
    path = Path(_beside(source, name))
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
    from harness.cell.models import resolve_mode

    for i, spec in enumerate(suite.models):
        if resolve_mode(spec.name, spec.mode, spec.trust_remote_code) != "classifier":
            continue
        for j, t in enumerate(suite.tasks):
            if task_kind(t) != "classification":
                raise ConfigError(
                    f"{source}: tasks[{j}]: {t.name} is a {task_kind(t)} task, scored through prompts; "
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
    from harness.cell.models import head_module_names, output_module_names, resolve_mode, skeleton
    from harness.contract import ModelContext

    for spec in suite.models:
        mode = resolve_mode(spec.name, spec.mode, spec.trust_remote_code) or "classifier"
        model = skeleton(spec.name, spec.trust_remote_code, mode)
        if model is None:  # architecture unknown without the network; the run will say
            continue
        positions = getattr(model.config, "max_position_embeddings", None)
        lengths = [("train.max_seq_len", suite.train.max_seq_len)]
        lengths += [
            (f"methods[{i}].train.max_seq_len", m.train["max_seq_len"])
            for i, m in enumerate(suite.methods)
            if "max_seq_len" in m.train
        ]
        for where, n in lengths:
            if positions and isinstance(n, int) and n > positions:
                raise ConfigError(
                    f"{source}: {where}: {n} is beyond {spec.name}'s {positions} positions; allowed: ≤ {positions}"
                )
        ctx = ModelContext(
            task_type="causal_lm" if mode == "prompt" else "seq_cls",
            num_labels=2,  # the skeleton's head
            model_type=model.config.model_type,
            head_names=head_module_names(model),
            output_names=output_module_names(model),
        )
        for i, m in enumerate(suite.methods):
            method = known[m.method](known[m.method].Config.model_validate(m.config))
            try:
                method.check_model(model, ctx)
            except ValueError as err:
                field = getattr(err, "field", "")  # methods.common.FieldError names the field at fault
                where = f"methods[{i}].config" + (f".{field}" if field else "")
                raise ConfigError(
                    f"{source}: {where}: {err} (model {spec.name}, method {m.method}/{m.variant})"
                ) from None


def load_suite(path: str | Path) -> Suite:
    """The suite file at ``path``, validated in full (both phases)."""
    return parse_suite(read_suite_file(path), str(path))


def read_suite_file(path: str | Path) -> Any:
    """The suite file's YAML data; whatever makes it unreadable is one ConfigError naming the file."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: no such suite file")
    if path.is_dir():
        raise ConfigError(f"{path}: is a directory; give the suite's YAML file")
    if not path.is_file():  # a FIFO or a device would block the read, or never end
        raise ConfigError(f"{path}: is not a regular file; a suite is a YAML text file")
    size = path.stat().st_size
    if size > MAX_SUITE_BYTES:  # it is copied into the results and the report: a suite is a page of YAML
        limit = f"{MAX_SUITE_BYTES // 2**20} MiB"
        raise ConfigError(f"{path}: is {size / 2**20:.1f} MiB; a suite file may be at most {limit}")
    text = read_user_text(path, "; a suite is a YAML text file")
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{path}: malformed YAML{where}: {problem}") from None
    except (RecursionError, ValueError, TypeError) as err:  # e.g. nesting deeper than the parser goes
        raise ConfigError(f"{path}: cannot be read as YAML ({type(err).__name__})") from None


def _resolved(spec: ModelSpec) -> tuple[ModelSpec, str | None]:
    """A local model folder by its resolved path and a fingerprint of what it holds: the same text pointing
    elsewhere (or the same folder holding another model) is another cell, never "already recorded"."""
    path = Path(spec.name).expanduser()
    if spec.name in ALIASES or not (spec.name.startswith((".", "/", "~")) or path.is_dir()):
        return spec, None
    return spec.model_copy(update={"name": str(path.resolve())}), fingerprint(str(path))


def expand(suite: Suite) -> list[RunConfig]:
    """The suite grid: models × tasks × methods (variants) × seeds, in a stable order. Within a (model, task) the
    cells run a seed at a time, each seed's round starting one configuration later (seed 0: full, lora, qlora;
    seed 1: lora, qlora, full; …): a machine that drifts during a suite (step times here moved 24% between two
    runs of one cell) then spreads over every configuration's seeds, where it shows as run-to-run noise, rather
    than landing on the configurations that happened to run last."""
    cells = []
    for spec in suite.models:
        model, fp = _resolved(spec)
        for task in suite.tasks:
            configs = [
                (
                    m,
                    get_method(m.method).Config.model_validate(m.config).model_dump(mode="json"),
                    TrainConfig.model_validate({**suite.train.model_dump(), **m.train}),
                )
                for m in suite.methods
            ]
            for i, seed in enumerate(suite.seeds):
                for m, cfg, train in configs[i % len(configs) :] + configs[: i % len(configs)]:
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
                            model_fingerprint=fp,
                            allow_network=suite.allow_network,
                            num_cpus=suite.num_cpus,
                            num_gpus=suite.num_gpus,
                            retries=suite.retries,
                            export=suite.export,
                            deploy=suite.deploy,
                            forgetting=suite.forgetting,
                            method_source=m.source,
                            device=suite.device,
                        )
                    )
    return cells
