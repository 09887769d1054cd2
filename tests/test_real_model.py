"""Real pretrained model, real data: MiniLM-L6 learns Rotten Tomatoes with both methods (a short run)."""

import pytest

from harness.cell import run_cell
from tests.conftest import cells

pytestmark = pytest.mark.real_model


@pytest.mark.parametrize("method,config,lr", [("full", {}, 8e-5), ("lora", {"r": 8}, 2e-3)])
def test_minilm_beats_untrained_head(tmp_path, method, config, lr):
    cfg = cells(
        models=["minilm-l6"],
        tasks=[{"name": "rotten_tomatoes", "eval_examples": 300}],
        train={"steps": 100, "batch_size": 16, "lr": lr, "max_seq_len": 64, "warmup_steps": 10},
        methods=[{"method": method, "config": config}],
    )[0]
    rec = run_cell(cfg, tmp_path)
    assert rec.status == "ok", rec.error
    assert rec.eval_after.accuracy > rec.eval_before.accuracy + 0.1, (rec.eval_before, rec.eval_after)
    assert rec.losses[-1] < rec.losses[0]
    if method == "lora":
        merged = next(e for e in rec.exports if e.kind == "merged")
        assert merged.max_abs_logit_diff < 1e-3 and merged.eval.accuracy == pytest.approx(
            rec.eval_after.accuracy, abs=0.004
        )
