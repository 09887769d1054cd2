"""Why QA-LoRA trails on MiniLM: the diagnostic suites' comparisons as claims with verdicts
(suites/qalora_capacity.yaml, suites/qalora_pooling_tuned.yaml; docs/qalora_capacity.md reads them).

Each row is a hypothesis from the review of methods/qalora.py against the paper and the authors' code, judged
exactly as the papers' claims are (reports/claims.py): paired on the same test examples, a 95% bootstrap
interval over examples and seeds, "≈" inside ±1 accuracy point, "A loses" only beyond noise.
"""

from __future__ import annotations

from harness.records import RunRecord
from reports.claims import Runs, Verdict, _compare, direction, equivalence

REVIEW = "review of methods/qalora.py (issue 32)"
LORA8, LORA4, G1 = "lora/r8", "lora/r4", "qalora/g1"
INT8_G4, INT8_G32, INT8_G128 = "qalora/int8-g4", "qalora/int8-g32", "qalora/int8-g128"
INT4, INT4_R16, NOPOOLER, MEAN = (
    "qalora/int4-g32",
    "qalora/int4-g32-r16",
    "qalora/int4-g32-nopooler",
    "qalora/int4-g32-mean",
)
CAPACITY = {LORA8, LORA4, G1, INT8_G4, INT8_G32, INT8_G128, INT4, INT4_R16, NOPOOLER, MEAN}
SUM_TUNED, MEAN_TUNED = "qalora/int4-g32-sum", "qalora/int4-g32-mean"
POOLING = {SUM_TUNED, MEAN_TUNED}


def _count(runs: Runs, key: str) -> str:
    rs = runs.by.get(key, [])
    return f"{rs[0].trainable_params:,}" if rs and rs[0].trainable_params else "?"


def _lr(runs: Runs, key: str) -> str:
    rs = runs.by.get(key, [])
    return f"{rs[0].config['train']['lr']:.2g}" if rs else "?"


def capacity_claims(records: list[RunRecord]) -> list[Verdict]:
    """suites/qalora_capacity.yaml: implementation, pooled width, quantization, capacity, pooler, pooling."""
    runs = Runs(records)
    out = []

    def add(claim, hypothesis, a, b, judge, extra="", **kw):
        measured, verdict, why = _compare(runs, (a, None), (b, None), judge, **kw)
        out.append(Verdict(claim, REVIEW, hypothesis, measured + extra, verdict, why))

    add("At g = 1 QA-LoRA is LoRA on the fp16-rounded base: the same accuracy (an implementation check)",
        "g = 1: pooling is the identity, the layer equals LoRA's to 5e-7", G1, LORA8, equivalence)  # fmt: skip
    add("The pooled width costs accuracy: INT8 QA-LoRA at g = 128 (3 pooled inputs on a 384-wide layer) loses "
        "against g = 4 (96)", "capacity: d_in / g pooled inputs", INT8_G128, INT8_G4, direction, loss=True)  # fmt: skip
    add("It costs already at g = 32 (12 pooled inputs): INT8 QA-LoRA loses against LoRA",
        "capacity: d_in / g pooled inputs", INT8_G32, LORA8, direction, loss=True)  # fmt: skip
    add("Quantization is not the cause: INT4 ≈ INT8 at g = 32 (RTN weight error 9% vs 0.4%)",
        "quantizer error", INT4, INT8_G32, equivalence)  # fmt: skip
    add("Not the trainable count: QA-LoRA r8 g32 loses against LoRA r4 with about as many parameters",
        "capacity: parameter count", INT4, LORA4, direction,
        f"; trainable {_count(runs, INT4)} vs {_count(runs, LORA4)}", loss=True)  # fmt: skip
    add("Twice the rank recovers it: QA-LoRA r16 beats r8 at g = 32 (same learning rate)",
        "capacity: rank", INT4_R16, INT4, direction)  # fmt: skip
    add("Not the BERT pooler: left in float and unadapted ≈ quantized and adapted through 12 group sums",
        "the pooler reads 12 sums of the CLS state", NOPOOLER, INT4, equivalence)  # fmt: skip
    add("At sum pooling's learning rate (1e-3), mean pooling (the authors' code) loses against sum (the paper)",
        "pooling: a sum is a mean with A's scale and step × g", MEAN, INT4, direction, loss=True)  # fmt: skip
    return out


def pooling_claims(records: list[RunRecord]) -> list[Verdict]:
    """suites/qalora_pooling_tuned.yaml: each pooling at its own tuned learning rate."""
    runs = Runs(records)
    measured, verdict, why = _compare(runs, (MEAN_TUNED, None), (SUM_TUNED, None), direction)
    lrs = f"; tuned lr: mean {_lr(runs, MEAN_TUNED)}, sum {_lr(runs, SUM_TUNED)}"
    return [
        Verdict(
            "Mean pooling (the authors' AvgPool1d) beats sum pooling (the paper's Algorithm 1), each at its own "
            "tuned learning rate",
            REVIEW,
            "pooling: the same model, not the same optimisation under Adam",
            measured + lrs,
            verdict,
            why,
        )
    ]
