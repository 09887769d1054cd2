"""Markdown output: the one escaping rule for every string a user controls (model paths, data file names, labels,
variants, descriptions) and the one table writer. A renderer must show such a string as text: no tag, entity,
link or emphasis may come out of it, and no pipe may break a table. Our own text ("p < 0.0001") stays readable.
"""

from __future__ import annotations

import re

# CommonMark: any ASCII punctuation may be backslash-escaped. Escape what can start markup: emphasis and code,
# links and images, table cells, backslashes; `<` only where it opens a tag, `&` only where it opens an entity;
# `_` only at a word's edge (inside a word, as in lora_r8, it never emphasises).
_MARKUP = re.compile(r"[\\`*\[\]|~]|<(?=[A-Za-z/!?])|&(?=#?\w+;)|(?<![A-Za-z0-9])_|_(?![A-Za-z0-9])")


def md(text: object) -> str:
    """``text`` as Markdown that renders as exactly that text, on one line."""
    return _MARKUP.sub(lambda m: "\\" + m.group(0), " ".join(str(text).splitlines()))


def md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A pipe table, every cell escaped with :func:`md`."""
    lines = ["| " + " | ".join(md(c) for c in header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(md(c) for c in row) + " |" for row in rows]


def csv_text(rows: list[dict]) -> str:
    """Rows as CSV that a spreadsheet opens as data: a string cell starting with ``= + - @`` (or a tab / carriage
    return) would be read as a formula (a model folder named ``=HYPERLINK(…)`` runs as one), so it is prefixed with
    ``'``, the OWASP advice. Numbers are left as they are."""
    import pandas as pd

    def cell(v: object) -> object:
        return "'" + v if isinstance(v, str) and v[:1] in ("=", "+", "-", "@", "\t", "\r") else v

    return pd.DataFrame([{k: cell(v) for k, v in r.items()} for r in rows]).to_csv(index=False)
