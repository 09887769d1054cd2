"""The one exception a tuning trial's cell raises when its study's pruner stops it (a leaf: no imports)."""

from __future__ import annotations


class Pruned(Exception):
    """The study's pruner stopped this trial at ``step``; ``curve`` is its validation curve up to there."""

    def __init__(self, message: str, step: int, curve: list[dict]) -> None:
        super().__init__(message)
        self.step, self.curve = step, curve
