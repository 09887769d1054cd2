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


def group_split(rows: list, seed: int, fractions: tuple[float, float] = (0.8, 0.9)) -> tuple[list[Example], ...]:
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
