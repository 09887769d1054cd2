"""The claims' verdicts (reports/claims.py) and the measurements behind them (harness/measure/quanterror.py): intervals
that decide, verdicts that follow their rules on constructed data, quantization errors and double
quantization's bits measured from bitsandbytes, and `ftbench claims` end to end on a tiny suite."""

import numpy as np
import pytest
import torch

from harness.measure.quanterror import bnb_roundtrip, constant_bits, int4_absmax, relative_error
from reports.claims import diff_interval, direction, equivalence


def _bits(p: float, n: int, seeds: int, rng) -> np.ndarray:
    return (rng.random((seeds, n)) < p).astype(float)


def test_identical_answers_are_equivalent_and_a_clear_gap_is_not():
    rng = np.random.default_rng(0)
    a = _bits(0.7, 1000, 2, rng)
    d, lo, hi = diff_interval(a, a.copy())
    assert (d, lo, hi) == (0.0, 0.0, 0.0) and equivalence(d, lo, hi, 1000, 1000)[0] == "reproduced"
    b = _bits(0.5, 1000, 2, rng)
    d, lo, hi = diff_interval(a, b)
    assert lo > 0.1 and equivalence(d, lo, hi, 1000, 1000)[0] == "not reproduced"
    assert direction(d, lo, hi, 1000, 1000)[0] == "reproduced"  # A beats B
    assert direction(-d, -hi, -lo, 1000, 1000)[0] == "not reproduced"  # the other way


def test_a_small_test_set_is_inconclusive_and_says_how_many_examples_would_decide():
    rng = np.random.default_rng(1)
    a, b = _bits(0.72, 100, 1, rng), _bits(0.70, 100, 1, rng)
    d, lo, hi = diff_interval(a, b)
    verdict, why = equivalence(d, lo, hi, 100, 1066)
    assert verdict == "inconclusive" and "test examples at this spread would decide it" in why


def test_a_loss_claim_needs_the_interval_below_zero():
    assert direction(-0.03, -0.05, -0.01, 1000, 1000, loss=True)[0] == "reproduced"
    assert direction(0.0, -0.004, 0.004, 1000, 1000, loss=True)[0] == "not reproduced"  # no loss of a point
    assert direction(-0.01, -0.03, 0.01, 1000, 1000, loss=True)[0] == "inconclusive"


def test_nf4_has_the_lowest_error_on_normal_weights_at_equal_bits():
    w = torch.randn(256, 256, generator=torch.Generator().manual_seed(0)) * 0.02
    nf4, fp4 = (relative_error(w, bnb_roundtrip(w, t)[0]) for t in ("nf4", "fp4"))
    int4 = relative_error(w, int4_absmax(w))
    assert nf4 < int4 and nf4 < fp4, (nf4, fp4, int4)
    q = int4_absmax(w).reshape(-1, 64)
    scale = w.reshape(-1, 64).abs().amax(-1, keepdim=True) / 7
    assert torch.all((q / scale - (q / scale).round()).abs() < 1e-3)  # on the grid
    assert torch.all((q - w.reshape(-1, 64)).abs() <= scale / 2 + 1e-7)  # round to nearest


def test_double_quantization_bits_are_read_from_bitsandbytes_state():
    w = [torch.randn(1024, 1024, generator=torch.Generator().manual_seed(0))]
    plain, dq = constant_bits(w, False), constant_bits(w, True)
    assert plain == pytest.approx(0.5)  # one fp32 absmax per 64
    # 8-bit absmax per 64, fp32 per 256 of those, the 256-entry fp32 code book and the offset, on 2^20 params
    assert dq == pytest.approx(8 / 64 + 32 / (64 * 256) + (256 * 32 + 32) / 2**20, rel=1e-6)


def test_ftbench_claims_end_to_end_on_a_tiny_suite(tmp_path, write_suite):
    """Every claims configuration on tiny-bert, one seed: the page and md are written, every task claim is
    judged (none 'not run'), the measured ones read the cached measurements."""
    import json

    import yaml

    from harness.measure.quanterror import measure
    from tests.conftest import ROOT, run_cli

    data = yaml.safe_load((ROOT / "suites" / "claims.yaml").read_text())
    data.update(models=["tiny-bert"], seeds=[0], deploy={"enabled": False})
    for m in data["methods"]:  # tiny-bert is 32 wide: the "g128" configurations take the smallest group there
        if m["method"] == "qalora":
            m["config"]["group_size"] = 32 if m["variant"].endswith("g32") else 16
    data["tasks"] = [{"name": "rotten_tomatoes", "train_examples": 128, "eval_examples": 64}]
    data["train"] = {**data["train"], "steps": 4, "warmup_steps": 1, "max_seq_len": 32, "timing_warmup_steps": 1}
    results = tmp_path / "r"
    results.mkdir()
    cache = measure(models=(("tiny-bert", None, ("classifier",)),), big=512)
    (results / "claims_measurements.json").write_text(json.dumps(cache))
    out = run_cli("claims", "--suite", str(write_suite(data)), "--results", str(results))
    assert out.returncode == 0, out.stderr[-3000:]
    md = (results / "claims.md").read_text()
    verdicts = [v for v in ("| reproduced |", "| not reproduced |", "| inconclusive |") for _ in range(md.count(v))]
    assert "not run" not in md and len(verdicts) >= 20, md
    assert "LoRA ≈ full fine-tuning" in md and "Double quantization saves" in md and "tiny-bert:" in md
    assert "claims.html" in out.stdout and (results / "claims.html").read_text().count("<tr>") >= 21


def test_a_claims_suite_without_an_entry_a_claim_reads_is_refused_naming_it(tmp_path, write_suite):
    """Issue 28: claims bound to variant names silently became "not run" rows when a variant was renamed."""
    import yaml

    from tests.conftest import ROOT, run_cli

    data = yaml.safe_load((ROOT / "suites" / "claims.yaml").read_text())
    for m in data["methods"]:
        if m["variant"] == "r8":
            m["variant"] = "r8-renamed"
    out = run_cli("claims", "--suite", str(write_suite(data)), "--results", str(tmp_path / "r"), "--no-run")
    assert out.returncode == 2 and "the claims read entries this suite lacks: lora/r8 (method/variant)" in out.stderr
    assert not (tmp_path / "r" / "claims.html").exists()


def test_claims_without_the_source_tree_says_where_its_suite_is(tmp_path, monkeypatch):
    """Installed from a wheel, ftbench has no suites/ beside it: `ftbench claims` says so in one line (exit 2),
    rather than "no such suite file"."""
    import harness.driver.cli as cli
    from tests.conftest import run_cli

    monkeypatch.setattr(cli, "_shipped", lambda relative: tmp_path / relative)  # where a wheel would look
    out = run_cli("claims", "--no-run", "--results", str(tmp_path / "r"))
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "not installed with ftbench; run in a clone of ftbench, or --suite FILE" in out.stderr
    assert not (tmp_path / "r").exists()  # nothing written
