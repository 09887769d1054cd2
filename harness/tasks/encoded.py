"""A split's token ids, kept on disk so that the cells of a suite tokenize each split once.

Tokenizing the demo's 10,445 Rotten Tomatoes training snippets takes 0.6 s (the fast tokenizer, then Python lists),
and each of its four cells did it again; reading them back takes 0.03 s. The ids are stored as JSON (never pickle)
under ``cache_dir()/encoded``, named by everything they depend on: the encoding function's module (by content), the
tokenizer (its class and its whole serialized pipeline: vocabulary, normalizer, special tokens, post-processor),
the length limit, the examples themselves (text, pair, label, choices, answer) and what else the caller names (a
prompt's template and label words). A change to any of them is another file, so a stored split is never stale. A
tokenizer with no serialized form (a slow, Python-only one) is not stored. Prompts gain most: encoding BoolQ's
10,122 training prompts for SmolLM2 took 12.5 s in every cell (Zen 4).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable

from harness.atomic import atomic_write_text
from harness.cache import cache_dir
from harness.tasks.data import Example
from harness.tasks.parsed import source_digest

FORMAT = 1  # bump when the stored layout changes
MIN_EXAMPLES = 1000  # smaller splits tokenize in milliseconds: not worth a file


def _key(fn: Callable, examples: list[Example], tokenizer, max_len: int, context: str) -> str | None:
    fn = getattr(fn, "func", fn)  # a functools.partial: the function's code; what it was given is in ``context``
    backend = getattr(tokenizer, "backend_tokenizer", None)
    code = source_digest(fn)
    try:
        pipeline = json.loads(backend.to_str()) if backend is not None else None
    except (AttributeError, ValueError):
        return None
    if code is None or not isinstance(pipeline, dict):
        return None
    for call_state in ("truncation", "padding"):  # what the last call set, not what the tokenizer is
        pipeline.pop(call_state, None)
    h = hashlib.sha256(f"{FORMAT}:{fn.__qualname__}:{type(tokenizer).__name__}:{max_len}:{context}".encode())
    h.update(code.encode())
    h.update(json.dumps(pipeline, sort_keys=True).encode())
    h.update(json.dumps([[x.text, x.text_pair, x.label, list(x.choices), x.answer] for x in examples]).encode())
    return h.hexdigest()[:32]


def cached_encode(fn: Callable, examples: list[Example], tokenizer, max_len: int, context: str = "") -> list[dict]:
    """``fn(examples, tokenizer, max_len)`` (a list of dicts of int lists and a label), from the stored copy when
    there is one, else computed and stored for the next cell. ``context``: whatever else the encoding depends on
    (a prompt's template and label words), part of the file's name."""
    key = _key(fn, examples, tokenizer, max_len, context) if len(examples) >= MIN_EXAMPLES else None
    if key is None:
        return fn(examples, tokenizer, max_len)
    path = cache_dir() / "encoded" / f"{key}.json"
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
        columns = stored["columns"]
        rows = [dict(zip(columns, values, strict=True)) for values in stored["rows"]]
        if len(rows) == len(examples):
            return rows
    except (OSError, ValueError, KeyError, TypeError):  # none yet, or unreadable: tokenize afresh
        pass
    rows = fn(examples, tokenizer, max_len)
    columns = sorted({k for r in rows for k in r})
    if all(set(r) == set(columns) for r in rows):  # one layout for every row, else not stored
        try:
            text = json.dumps({"columns": columns, "rows": [[r[c] for c in columns] for r in rows]})
            atomic_write_text(path, text)
        except (OSError, TypeError):  # a read-only cache, or a value JSON cannot hold: costs speed, not the run
            pass
    return rows
