"""Which claims a suite answers. ``ftbench claims --suite S`` judges every claim set whose entries (method/variant)
S holds: the papers' claims (suites/claims.yaml, reports/claims.py) or the QA-LoRA diagnostics
(suites/qalora_capacity.yaml and suites/qalora_pooling_tuned.yaml, reports/qalora_claims.py). A suite that holds
none is refused, naming the entries the nearest set lacks: a renamed variant is an error, not an empty row."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from harness.records import RunRecord
from reports import claims, qalora_claims


@dataclass(frozen=True)
class ClaimSet:
    """A set of claims: the suite entries it reads and how it judges them."""

    name: str
    entries: frozenset[str]
    verdicts: Callable[[list[RunRecord]], list[claims.Verdict]]
    measurements: bool = False  # also the claims measured without training (quantization error, bits)


SETS = (
    ClaimSet("papers", frozenset(claims.ENTRIES), claims.task_claims, measurements=True),
    ClaimSet("qalora_capacity", frozenset(qalora_claims.CAPACITY), qalora_claims.capacity_claims),
    ClaimSet("qalora_pooling", frozenset(qalora_claims.POOLING), qalora_claims.pooling_claims),
)


def select(entries: set[str]) -> list[ClaimSet]:
    """The claim sets ``entries`` answers; ValueError naming what the nearest set lacks if none."""
    found = [s for s in SETS if s.entries <= entries]
    if found:
        return found
    nearest = min(SETS, key=lambda s: len(s.entries - entries))
    missing = sorted(nearest.entries - entries)
    raise ValueError(f"the claims read entries this suite lacks: {', '.join(missing)} (method/variant)")
