"""A task's examples and splits: the leaf types every task module shares.

Splits are a pure function of the data and a seed, so every method of a suite sees exactly the same examples;
the record stores split sizes and a SHA-256 of the examples so two records can be checked to have used the same
data.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass

KINDS = ("classification", "multiple_choice", "generation", "language_modeling")


@dataclass(frozen=True)
class Example:
    """One example: text (and a pair), label, group for splitting, choices or an answer."""

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
    io: str | None = None  # "module:Class": the TaskIO reading this task whatever the mode (None: the mode's)

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
            # the right label (multiple choice: choice) of each test example in order, beside each run's predictions
            "test_label_ids": ",".join(str(x.label) for x in self.test) if self.kind in KINDS[:2] else None,
        }


def group_split(rows: list, seed: int, fractions: tuple[float, float] = (0.8, 0.9)) -> tuple[list[Example], ...]:
    """Split by group (e.g. movie), so snippets about one movie never straddle train and test; then shuffle
    each split with the seed. Assignment uses a seeded hash of the group name: stable across Python runs.
    Groups that share an example's content (text and text pair, whitespace and case aside) are joined, so a
    copy never lands in another split than its original: BBC News has 15 test articles that are verbatim
    copies of training ones under another file name."""
    xs = [r if isinstance(r, Example) else Example(r[0], r[1], r[2], r[3] if len(r) > 3 else None) for r in rows]
    parent: dict[str, str] = {}

    def root(k: str) -> str:  # union-find over group names and content keys; a root is the first one seen
        while parent.setdefault(k, k) != k:
            parent[k] = parent[parent[k]]
            k = parent[k]
        return k

    for x in xs:
        g, c = root("g:" + x.group), root("c:" + content_key(x))
        if g != c:
            parent[c] = g
    splits: tuple[list[Example], ...] = ([], [], [])
    for x in xs:
        u = int.from_bytes(hashlib.sha256(f"{seed}:{root('g:' + x.group)[2:]}".encode()).digest()[:8], "big") / 2**64
        idx = 0 if u < fractions[0] else (1 if u < fractions[1] else 2)
        splits[idx].append(x)
    for i, s in enumerate(splits):
        random.Random(seed * 1000 + i).shuffle(s)
    return splits


def content_key(x: Example) -> str:
    """What makes two examples the same input: their text and text pair, whitespace and case aside."""
    return " ".join(f"{x.text}\x00{x.text_pair or ''}".split()).casefold()


def input_lengths(kept: list[int], cut: list[int]) -> dict:
    """A split's inputs in tokens as the model reads them (``kept``) and how many tokens of each were cut to fit
    max_seq_len (``cut``): examples, how many were cut, and the median and longest length before cutting. Every
    method of a configuration reads the same cut inputs; the report says so where many are (BBC News at MiniLM's
    default 128 tokens: every test article cut, median 424 tokens)."""
    uncut = sorted(k + c for k, c in zip(kept, cut, strict=True))
    n = len(uncut)
    median = (uncut[(n - 1) // 2] + uncut[n // 2]) / 2 if n else 0.0
    return {
        "examples": n,
        "cut": sum(c > 0 for c in cut),
        "tokens_median_uncut": median,
        "tokens_max_uncut": max(uncut, default=0),
    }


CUT_NOTE_SHARE = 0.01  # a split with at least this share of its inputs cut is named where figures are read


def cut_note(lengths: dict[str, dict], max_seq_len: int) -> str | None:
    """One line saying how many train and test inputs ``input_lengths`` found cut to ``max_seq_len`` (None where
    under 1% of each split were): a model that read the first 128 of 424 tokens is scored on less than the task."""
    parts = []
    for split in ("test", "train"):
        s = lengths.get(split) or {}
        if s.get("cut") and s["cut"] >= CUT_NOTE_SHARE * s["examples"]:
            parts.append(f"{s['cut']:,} of {s['examples']:,} {split} (median length {s['tokens_median_uncut']:.0f})")
    return f"inputs longer than max_seq_len {max_seq_len} tokens, cut to it: " + ", ".join(parts) if parts else None
