"""A registered task's parsed, split examples, kept on disk so a cell does not parse its data again.

Reading Rotten Tomatoes from its bz2 CSV and splitting it by movie takes about 0.35 s, and every cell (and the
driver's check of split sizes) did it again: most of a small cell's fixed cost, and about a minute of `make test`.
The parsed task is stored as JSON (never pickle) under ``cache_dir()/tasks``. It is used only while three things
are unchanged: the loader's code (its module file and ``data.py``'s, by content), the split seed, and the size and
modification time of every file under the task's ``source``. Anything else parses afresh and stores again. A task
whose source is not a file or folder (the synthetic task) is not stored: nothing could tell when it is stale.
"""

from __future__ import annotations

import hashlib
import inspect
import json
from collections.abc import Callable
from pathlib import Path

from harness.atomic import atomic_write_text
from harness.cache import cache_dir
from harness.tasks import data as data_module
from harness.tasks.data import Example, TaskData

FORMAT = 1  # bump when the stored layout changes


def source_signature(source: str) -> list | None:
    """Size and modification time of the file, or of every file under the folder, ``source`` names; None when
    it names neither (then the parsed task is never stored)."""
    path = Path(source)
    try:
        if path.is_file():
            st = path.stat()
            return [[path.name, st.st_size, st.st_mtime_ns]]
        if path.is_dir():
            stats = sorted((str(p.relative_to(path)), p.stat()) for p in path.rglob("*") if p.is_file())
            return [[name, st.st_size, st.st_mtime_ns] for name, st in stats]
    except OSError:
        return None
    return None


def source_digest(*code: object) -> str | None:
    """SHA-256 of the source files that define ``code`` (functions, modules), by content: editing one changes
    it. None where one has no source file (built at run time): then nothing made from it is stored."""
    try:
        files = {inspect.getsourcefile(c) for c in code}
        h = hashlib.sha256()
        for f in sorted(str(f) for f in files):
            h.update(Path(f).read_bytes())
        return h.hexdigest()
    except (TypeError, OSError):
        return None


def _code_digest(loader: Callable) -> str | None:
    """The loader's module file and the splitting code, by content: editing either makes the stored task stale."""
    code = source_digest(loader, data_module)
    return None if code is None else f"{FORMAT}:{code}"


def _encode(x: Example) -> list:
    return [x.text, x.label, x.group, x.text_pair, list(x.choices), x.answer]


def _decode(r: list) -> Example:
    return Example(r[0], r[1], r[2], r[3], tuple(r[4]), r[5])


def _to_json(task: TaskData, signature: list) -> str:
    splits = {s: [_encode(x) for x in getattr(task, s)] for s in ("train", "validation", "test")}
    fields = {k: getattr(task, k) for k in ("name", "labels", "source", "kind", "prompt", "label_words", "io")}
    return json.dumps({"signature": signature, "fields": fields, "splits": splits})


def _from_json(text: str) -> tuple[list, TaskData]:
    stored = json.loads(text)
    splits = {s: [_decode(r) for r in rows] for s, rows in stored["splits"].items()}
    return stored["signature"], TaskData(**stored["fields"], **splits)


def load_parsed(name: str, seed: int, loader: Callable[[int], TaskData]) -> TaskData:
    """``loader(seed)``, from the stored copy when it is current, else parsed and stored for the next cell."""
    code = _code_digest(loader)
    if code is None:
        return loader(seed)
    path = cache_dir() / "tasks" / f"{name}-{seed}-{hashlib.sha256(f'{name}:{code}'.encode()).hexdigest()[:16]}.json"
    try:
        signature, task = _from_json(path.read_text(encoding="utf-8"))
        if signature == source_signature(task.source):
            return task
    except (OSError, ValueError, KeyError, TypeError, IndexError):  # none yet, or unreadable: parse afresh
        pass
    task = loader(seed)
    signature = source_signature(task.source)
    if signature is not None:
        try:
            atomic_write_text(path, _to_json(task, signature))
        except OSError:  # a read-only cache costs speed, not the run
            pass
    return task
