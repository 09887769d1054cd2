"""Your own data as a task of any kind: a csv or jsonl file (or a hub dataset where the hub is reachable), with
a column mapping. Classification (text + label), multiple choice (text + choices + the right one, as its index,
text or letter) and generation (text + answer); the same seeded split and hashes as the registered tasks, and
every problem one line naming the file, the row and the column.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from harness.schema import ConfigError, TaskSpec
from harness.tasks.data import Example, TaskData, group_split

GENERIC = {"csv", "jsonl", "hf"}


def read_user_text(path: Path, what: str = "") -> str:
    """A file a user gave us, as UTF-8 text (a byte-order mark, as Excel's "CSV UTF-8" writes, is dropped);
    whatever makes it unreadable is one ConfigError naming it."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text (byte {err.start}){what}") from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot read it: {err.strerror or err}") from None


def _delimiter(text: str) -> str:
    """A comma, unless the header is one field by commas and holds exactly one of ; tab | (a European
    spreadsheet's "CSV" is ;-separated, a .tsv tab-separated): a one-column file cannot be a task anyway."""
    header = next(csv.reader(io.StringIO(text.split("\n", 1)[0])), [])
    others = [d for d in ";\t|" if d in (header[0] if len(header) == 1 else "")]
    return others[0] if len(others) == 1 else ","


def generic_kind(spec: TaskSpec) -> str:
    """The kind of a csv / jsonl / hf task: classification unless ``kind:`` says otherwise."""
    return spec.kind or "classification"


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
    kind = generic_kind(spec)
    if spec.name in ("csv", "jsonl") and not spec.path:
        raise ConfigError(f"{where}.path: a {spec.name} task needs path: <its file, relative to the suite file>")
    if spec.name in ("csv", "jsonl") and not Path(spec.path).expanduser().is_file():
        what = "is not a regular file" if Path(spec.path).expanduser().exists() else "does not exist"
        raise ConfigError(f"{where}.path: {spec.path} {what} (paths are relative to the suite file)")
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
    roles = {k: v for k, v in spec.columns.model_dump().items() if isinstance(v, str)}
    taken: dict[str, str] = {}
    for role, col in roles.items():  # text as its own label (or a group per class) trains on nothing to learn
        if col in taken:
            raise ConfigError(
                f"{where}.columns.{role}: {col!r} is also columns.{taken[col]}; each role needs a column of its own"
            )
        taken[col] = role
    if spec.label_words and kind != "classification":
        raise ConfigError(f"{where}.label_words: apply to classification tasks, not {kind}")
    if spec.name == "hf" and not allow_network:
        raise ConfigError(
            f"{where}.dataset: {spec.dataset!r} would be fetched from the Hugging Face hub, but "
            "runs are offline; set `allow_network: true` at the suite's top level where the hub is reachable, or "
            "export it to a local csv / jsonl file"
        )


def _choice_index(value, choices: list[str], by_text: bool = False) -> int | None:
    """The right choice given as its index (0-based), its text, or its letter (A, B, ...). ``by_text``: the file
    gives every row's answer as one of its choices' texts, so a number is a text first ("24" of ["21", "25",
    "24"] is the third choice, not index 24; "2" of ["1", "2", "3"] the second, not index 2)."""
    text = str(value).strip()
    if by_text and text in choices:
        return choices.index(text)
    if isinstance(value, int) or text.isdigit():
        i = int(text)
        if 0 <= i < len(choices):
            return i
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
    c, kind = spec.columns, generic_kind(spec)
    if not records:
        raise ConfigError(f"{source}: no rows")
    wanted = [c.text, c.label, c.text_pair, c.group, c.answer] + (
        c.choices if isinstance(c.choices, list) else [c.choices]
    )
    missing = [k for k in wanted if k and k not in records[0]]
    if missing:
        raise ConfigError(f"{source}: no column {missing[0]!r}; columns are {', '.join(records[0])}")
    labels = sorted({str(r[c.label]).strip() for r in records}) if kind == "classification" else ["answer"]
    if kind == "classification":
        blank = next((i for i, r in enumerate(records) if r[c.label] is None or not str(r[c.label]).strip()), None)
        if blank is not None:
            raise ConfigError(f"{source}: row {blank + 1}: column {c.label!r} is empty; every row needs its label")
        folded: dict[str, str] = {}
        for label in labels:  # " POS " and "pos": a spreadsheet's accident, not two classes
            if (other := folded.setdefault(label.casefold(), label)) != label:
                raise ConfigError(
                    f"{source}: column {c.label!r} has labels {other!r} and {label!r}, which differ only in letter "
                    "case: they would be two classes; write each class one way"
                )
        if len(labels) > 2 and len(labels) > len(records) / 2:
            raise ConfigError(
                f"{source}: column {c.label!r} has {len(labels)} distinct labels in {len(records)} rows: too few "
                "examples per class to learn from (an id, or a number to regress?)"
            )
    index = {label: i for i, label in enumerate(labels)}
    # multiple choice: is every row's answer one of its choices' texts? Then a number in it is a text, not an index
    by_text = kind == "multiple_choice" and all(
        str(r[c.label]).strip() in _row_choices(r, c.choices, f"{source}: row {i + 1}") for i, r in enumerate(records)
    )
    out = []
    for i, r in enumerate(records):
        where = f"{source}: row {i + 1}"
        common = {
            "group": str(r[c.group]) if c.group else str(i),
            "text_pair": str(r[c.text_pair]) if c.text_pair else None,
        }
        if kind == "classification":
            out.append(Example(str(r[c.text]), index[str(r[c.label]).strip()], **common))
        elif kind == "multiple_choice":
            choices = _row_choices(r, c.choices, where)
            label = _choice_index(r[c.label], choices, by_text)
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
        text = read_user_text(path)
        if spec.name == "csv":
            try:
                records = list(csv.DictReader(io.StringIO(text, newline=""), delimiter=_delimiter(text)))
            except csv.Error as err:
                raise ConfigError(f"{path}: not a readable CSV file ({err})") from None
        else:
            records = []
            for n, line in enumerate(text.splitlines(), 1):
                if line.strip():
                    try:
                        records.append(json.loads(line))
                    except ValueError as err:
                        raise ConfigError(f"{path}: line {n} is not valid JSON ({err})") from None
                    if not isinstance(records[-1], dict):
                        raise ConfigError(f"{path}: line {n} is not a JSON object (got {type(records[-1]).__name__})")
        source = str(path)
    examples, labels = _examples_from_records(records, spec, source)
    train, val, test = group_split(examples, spec.split_seed)
    kind = generic_kind(spec)
    prompt = DEFAULT_PROMPTS[kind][1 if spec.columns.text_pair else 0]
    words = [f" {label}" for label in labels] if kind == "classification" else None
    return TaskData(spec.name, labels, train, val, test, source, kind=kind, prompt=prompt, label_words=words)
