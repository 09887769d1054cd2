"""The quantized-merge league (reports/league.py) and the QA-LoRA diagnostic claims (reports/qalora_claims.py,
reports/claim_sets.py), on real tiny runs."""

import pytest

from harness.cell.run import run_cell
from reports import league
from reports.claim_sets import SETS, select
from reports.qalora_claims import CAPACITY, POOLING, capacity_claims, pooling_claims
from tests.conftest import cells

TRAIN = {"steps": 6, "batch_size": 8, "lr": 1e-2, "max_seq_len": 32, "timing_warmup_steps": 1}


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("league")
    methods = [
        {"method": "qlora", "variant": "nf4", "config": {"r": 4, "export_int_bits": 4, "export_int_group_size": 16}},
        {"method": "qat_lora", "variant": "int4", "config": {"r": 4, "group_size": 16}},
    ]
    out = [run_cell(c, tmp) for c in cells(methods=methods, train=TRAIN, seeds=[0, 1])]
    assert all(r.status == "ok" for r in out), [r.error for r in out]
    return out


def test_one_row_per_configuration_and_quantized_format(records):
    rows = {(r.config, r.format): r for r in league.rows(records)}
    assert set(rows) == {("qlora/nf4", "NF4 b64 DQ"), ("qlora/nf4", "INT4 g16 RTN"), ("qat_lora/int4", "INT4 g16 RTN")}
    assert all(r.seeds == 2 and r.served.shape == (2, 64) for r in rows.values())
    qat = rows[("qat_lora/int4", "INT4 g16 RTN")]
    assert qat.flips == 0.0 and qat.logit_diff == 0.0 and (qat.served == qat.trained).all()  # trained = served


def test_table_has_intervals_gaps_and_a_verdict_against_the_best(records):
    header, body = league.table(records)
    assert header[3] == "accuracy as served [95%]" and header[-1] == "vs the best"
    assert body[0][-1] == "best" and len(body) == 3
    for row in body[1:]:
        assert row[-1].startswith(("within noise of the best", "below the best"))
    qat = next(row for row in body if row[0] == "qat_lora/int4")
    assert qat[4].startswith("+0.0 [+0.0, +0.0]") and qat[5] == "0.0%"
    md = league.to_markdown(records)
    assert md.startswith("### Quantized-merge league") and "qat\\_lora/int4" not in md  # _ inside a word stays


def test_a_failed_or_float_export_is_not_a_league_row(records):
    broken = records[0].model_copy(deep=True)
    for e in broken.exports:
        e.error = "ValueError: x"
    assert all(r.config != "qlora/nf4" or r.seeds == 1 for r in league.rows([broken, records[1]]))


def test_claim_sets_are_chosen_by_the_suite_s_entries():
    assert [s.name for s in select(set(CAPACITY))] == ["qalora_capacity"]
    assert [s.name for s in select(set(POOLING) | {"full/x"})] == ["qalora_pooling"]
    with pytest.raises(ValueError, match=r"lacks: qalora/g1 \(method/variant\)"):
        select(set(CAPACITY) - {"qalora/g1"})
    assert len({s.name for s in SETS}) == len(SETS)


def _as(rec, key: str, seed: int, correct: str | None = None):
    method, variant = key.split("/")
    r = rec.model_copy(deep=True, update={"method": method, "variant": variant, "seed": seed})
    if correct is not None:
        r.eval_after.correct = correct
    return r


def test_capacity_claims_read_their_entries(records):
    base = [r for r in records if r.method == "qat_lora"]
    same = [_as(r, k, r.seed) for k in CAPACITY for r in base]
    verdicts = capacity_claims(same)
    assert len(verdicts) == 8 and all(v.verdict != "not run" for v in verdicts)
    assert verdicts[0].verdict == "reproduced"  # identical answers: g = 1 ≈ LoRA, inside ±1 point
    (pool,) = pooling_claims([_as(r, k, r.seed) for k in POOLING for r in base])
    assert pool.verdict == "inconclusive" and "tuned lr" in pool.measured
