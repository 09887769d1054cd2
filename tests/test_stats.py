"""Intervals and paired tests of reports/stats.py, and the report's refusal to call a win within noise."""

import numpy as np
import pytest

from harness.records import EvalMetrics, RunRecord
from reports import headline, stats


def run(method: str, bits: str, seed: int = 0, task: str = "t", step_s: float = 0.1) -> RunRecord:
    acc = bits.count("1") / len(bits)
    return RunRecord(
        cell_id=f"m__{task}__{method}__s{seed}",
        suite="s",
        method=method,
        variant="default",
        model="m",
        task=task,
        seed=seed,
        status="ok",
        started_at="2026-12-02T00:00:00+00:00",
        wall_time_s=1.0,
        config={},
        environment={},
        eval_after=EvalMetrics(accuracy=acc, loss=0.5, examples=len(bits), correct=bits),
        step_times_s=[step_s * (1 + 0.01 * i) for i in range(20)],
        trainable_params=100 if method != "full" else 10_000,
    )


def bits(n: int, right: set[int]) -> str:
    return "".join("1" if i in right else "0" for i in range(n))


def test_wilson_interval_matches_the_formula():
    lo, hi = stats.wilson(0.8, 100)
    z = 1.959964
    centre = (0.8 + z**2 / 200) / (1 + z**2 / 100)
    half = z / (1 + z**2 / 100) * np.sqrt(0.8 * 0.2 / 100 + z**2 / 40_000)
    assert lo == pytest.approx(centre - half, abs=1e-4) and hi == pytest.approx(centre + half, abs=1e-4)


def test_mcnemar_decides_on_the_examples_where_the_two_disagree():
    n = 300
    base = set(range(150))
    a = stats.summarize([run("a", bits(n, base | set(range(150, 190))))])  # 40 more right
    b = stats.summarize([run("b", bits(n, base))])
    c = stats.paired(a, b)
    assert c.significant and c.test.startswith("McNemar exact (40 vs 0") and c.p < 1e-6
    # The same 40-example gap made of swaps (45 vs 5 discordant) is still significant, but 3 vs 0 is not
    swapped = stats.summarize([run("a", bits(n, (base - set(range(5))) | set(range(150, 195))))])
    assert stats.paired(swapped, b).significant
    near = stats.summarize([run("a", bits(n, base | {150, 151, 152}))])
    assert not stats.paired(near, b).significant and stats.paired(near, b).verdict == "within noise"


def test_seed_noise_can_overrule_a_significant_example_level_difference():
    """Two seeds each: an example-level gap of 0.05 with seed-to-seed swings of 0.2 is within noise."""
    n = 400
    a = [run("a", bits(n, set(range(300))), 0), run("a", bits(n, set(range(220))), 1)]  # 0.75, 0.55
    b = [run("b", bits(n, set(range(250))), 0), run("b", bits(n, set(range(230))), 1)]  # 0.625, 0.575
    c = stats.paired(stats.summarize(a), stats.summarize(b))
    assert c.p < 0.05 and c.seed_se is not None and not c.significant and "not exceeded" in c.why


def test_holm_raises_p_values_over_a_family():
    n = 200
    runs = {k: stats.summarize([run(k, bits(n, set(range(100 + d))))]) for k, d in (("a", 14), ("b", 7), ("c", 0))}
    raw = stats.paired(runs["a"], runs["c"]).p
    adjusted = stats.compare_all(runs)[("a", "c")]
    assert adjusted.p >= raw and "Holm" in adjusted.test


@pytest.mark.parametrize(
    "pvals",
    [[0.01, 0.04, 0.03, 0.005], [0.5, 0.2, 0.9], [0.001, 0.001, 0.3, 0.04, 0.02], [0.4, 0.6], [0.03]],
)
def test_holm_adjustment_equals_statsmodels_and_the_step_down_by_hand(pvals):
    from statsmodels.stats.multitest import multipletests

    assert stats.holm(pvals) == pytest.approx(list(multipletests(pvals, method="holm")[1]), abs=1e-12)
    if pvals == [0.01, 0.04, 0.03, 0.005]:  # sorted 0.005, 0.01, 0.03, 0.04 × 4, 3, 2, 1 = 0.02, 0.03, 0.06, 0.04
        assert stats.holm(pvals) == pytest.approx([0.03, 0.06, 0.06, 0.02])  # then monotone: 0.04 → 0.06


def test_multi_seed_interval_over_examples_contains_the_mean_and_matches_a_bootstrap():
    n = 200
    s = stats.summarize([run("a", bits(n, set(range(120))), 0), run("a", bits(n, set(range(130))), 1)])
    assert s.seeds == 2 and s.mean == pytest.approx(0.625) and s.ci[0] < s.mean < s.ci[1]
    assert "± 0.035 (2 seeds)" in s.label
    boot = stats.bootstrap_means(np.mean([[c == "1" for c in r.eval_after.correct] for r in s.runs], axis=0))
    assert s.ci == pytest.approx(tuple(np.quantile(boot, [0.025, 0.975])), abs=0.006)  # the interior: the same


def test_seeds_that_got_every_example_right_keep_an_interval_over_the_examples():
    """60 of 60 right on two seeds is not certainty about the next 60 examples: Wilson's interval over the 60
    examples, as for one seed (a percentile bootstrap over examples gave [1.000, 1.000]). Seeds that agree on
    every example are one seed's evidence; seeds that disagree narrow it, down to n × seeds examples."""
    all_right = stats.summarize([run("a", "1" * 60, 0), run("a", "1" * 60, 1)])
    assert all_right.ci == pytest.approx(stats.wilson(1.0, 60)) and all_right.ci[0] < 0.95
    agree = stats.summarize([run("a", bits(100, set(range(70))), s) for s in (0, 1)])
    assert agree.ci == pytest.approx(stats.wilson(0.7, 100))
    disagree = stats.summarize([run("a", bits(100, set(range(i, 70 + i))), s) for s, i in ((0, 0), (1, 30))])
    assert disagree.mean == pytest.approx(0.7) and disagree.ci[1] - disagree.ci[0] < agree.ci[1] - agree.ci[0]
    widest_narrowing = stats.wilson(0.7, 200)  # as if all 2 × 100 answers were independent
    assert disagree.ci[1] - disagree.ci[0] >= widest_narrowing[1] - widest_narrowing[0] - 1e-9


def test_headline_bolds_and_calls_best_only_beyond_noise():
    n = 300
    clear = [run("a", bits(n, set(range(200)))), run("b", bits(n, set(range(140))))]
    close = [run("a", bits(n, set(range(150)))), run("b", bits(n, set(range(148))))]
    page_clear, page_close = headline.render(clear), headline.render(close)
    assert "<b>0.667" in page_clear and "below a/default" in page_clear
    assert "<b>" + "0.500" not in page_close and "within noise of a/default" in page_close
    best = {b.axis: b for b in headline.best_per_axis(headline.configs(close)[("m", "t")])}
    assert best["accuracy"].significant is False and best["trainable parameters"].significant is None


def test_records_without_per_example_answers_are_never_called_different():
    old = [run("a", bits(100, set(range(90)))), run("b", bits(100, set(range(10))))]
    for r in old:
        r.eval_after.correct = None
    c = stats.paired(stats.summarize(old[:1]), stats.summarize(old[1:]))
    assert not c.significant and c.p is None and "no per-example answers" in c.why


def test_gain_from_training_is_paired_on_the_same_examples():
    n = 400
    r = run("a", bits(n, set(range(240))))  # after: 0.60
    r.eval_before = EvalMetrics(accuracy=0.5, loss=0.7, examples=n, correct=bits(n, set(range(200))))
    assert stats.gain([r]).significant and stats.gain([r]).diff == pytest.approx(0.1)  # 40 vs 0 discordant
    small = run("b", bits(n, set(range(205))))
    small.eval_before = r.eval_before
    assert not stats.gain([small]).significant  # 5 vs 0: p = 0.06


def test_accuracy_and_macro_f1_agree_with_scikit_learn():
    """harness.tasks.classifier computes both without scikit-learn (a second of every cell's start): same numbers,
    a label never predicted and a predicted label that never occurs included."""
    import numpy as np
    from sklearn.metrics import accuracy_score, f1_score

    from harness.tasks.classifier import accuracy, macro_f1

    rng = np.random.default_rng(0)
    cases = [(rng.integers(0, 4, 200), rng.integers(0, 4, 200)), (np.array([0, 0, 1, 1]), np.array([0, 2, 2, 2]))]
    cases.append((np.array([1, 1, 1]), np.array([1, 1, 1])))
    for y_true, y_pred in cases:
        assert accuracy(y_true, y_pred) == accuracy_score(y_true, y_pred)
        assert macro_f1(y_true, y_pred) == pytest.approx(f1_score(y_true, y_pred, average="macro", zero_division=0))


def test_a_deployed_forms_accuracy_over_seeds_carries_its_interval_over_examples():
    """The deployment table gave one seed's accuracy a 95% interval and several seeds' none ("1.000 ± 0.000")."""
    from harness.records import DeploymentRecord, ExportRecord
    from reports import deployment

    runs = []
    for seed in (0, 1):
        r = run("lora", "1" * 60, seed)
        served = EvalMetrics(accuracy=1.0, loss=0.1, examples=60, correct="1" * 60)
        form = DeploymentRecord(name="fp32", dtype="float32", eval=served, latency=None)
        runs.append(
            r.model_copy(
                update={"exports": [ExportRecord(kind="merged", path="m", bytes_on_disk=9, deployments=[form])]}
            )
        )
    (row,) = deployment.table_rows(deployment.forms(runs)[("m", "t")])
    lo, hi = stats.wilson(1.0, 60)
    assert row[-2] == f"1.000 ± 0.000 [{lo:.3f}, {hi:.3f}]"
    assert row[-1] == "the same answers"  # as trained: every answer right on both seeds


def test_step_time_is_judged_against_students_t_at_the_repeats_degrees_of_freedom():
    """A run-to-run spread estimated from a few repeats is itself uncertain: with 2 degrees of freedom a ×1.25
    difference at sigma 0.05 is 3.2 standard errors (one run each), beyond the normal's 1.96 but within t(2)'s
    4.30; with 60 degrees of freedom (t 2.00) it is beyond noise."""
    a, b = run("a", "1", step_s=0.125), run("b", "1", step_s=0.1)
    few = stats.step_time_verdict([a], [b], 0.05, 2)
    many = stats.step_time_verdict([a], [b], 0.05, 60)
    assert not few.significant and "4.30 standard errors" in few.why and "×1.25" in few.why
    assert many.significant and "2.00 standard errors" in many.why


def test_a_bootstrap_p_value_is_never_zero():
    """Two seeds that gained on 40 of 60 examples and lost none: every resample agrees, and the report printed
    "p = 0". A finite bootstrap's p-value counts the observed sample too: 2 / 2001 here."""
    before = "0" * 40 + "1" * 20
    runs = [
        run("a", "1" * 60, s).model_copy(
            update={"eval_before": EvalMetrics(accuracy=20 / 60, loss=1.0, examples=60, correct=before)}
        )
        for s in (0, 1)
    ]
    g = stats.gain(runs)
    assert g.significant and g.p == pytest.approx(2 / (stats.BOOTSTRAP + 1))


def test_compare_says_when_old_and_new_ran_one_after_the_other():
    """Step time is judged against the seeds' spread within each side; when NEW ran wholly after OLD, a drift of the
    machine between them is not in it (the same cell, 9 minutes apart, differed by 34% on a 2-core VM), and compare says
    so. Interleaved runs share the drift: no note."""
    from reports.compare import drift_note, warnings

    def at(r, t):
        return r.model_copy(update={"started_at": f"2026-12-02T{t}:00+00:00"})

    old = [at(run("a", "1", 0), "10:00"), at(run("a", "1", 1), "10:05")]
    new = [at(run("a", "1", 0), "10:45"), at(run("a", "1", 1), "10:50")]
    assert "NEW ran 40 min after OLD" in drift_note(old, new) and "ABBA" in drift_note(old, new)
    assert any(w.startswith("note: NEW ran 40 min after OLD") for w in warnings(old, new))
    assert "NEW ran 40 min before OLD" in drift_note(new, old)
    assert drift_note([old[0], new[1]], [old[1], new[0]]) is None


def test_a_small_p_that_the_seeds_do_not_back_reads_within_seed_noise():
    """A's two seeds score 0.75 and 0.30, B's 0.40 twice, on the same 200 examples: the paired test over the
    examples says p < 0.05, but A − B = 0.125 is under twice its standard error over seeds (0.45). The verdict
    names the seeds, so "p < 0.001" beside it is not a contradiction."""
    from reports.terminal import _verdicts

    n = 200
    a = [run("a", bits(n, set(range(150))), seed=0), run("a", bits(n, set(range(60))), seed=1)]
    b = [run("b", bits(n, set(range(80))), seed=s) for s in (0, 1)]
    ranked = [headline.Config("a", a, stats.summarize(a)), headline.Config("b", b, stats.summarize(b))]
    pair = stats.paired(ranked[0].acc, ranked[1].acc)
    assert pair.p < 0.05 and not pair.significant and pair.noise == "within seed noise"
    assert _verdicts(ranked)["b"] == "seed noise (p < 0.001)"  # the terminal's short form: 100 columns
    one_seed = stats.paired(stats.summarize(a[:1]), stats.summarize(b[:1]))
    assert one_seed.significant and one_seed.verdict == "beyond noise"
    tie = stats.paired(stats.summarize(b), stats.summarize(b))
    assert tie.noise == "within noise"


def test_step_times_from_two_machines_are_not_judged_and_the_summary_says_so():
    """A results dir resumed on another machine: its runs' step times do not compare, whatever their spread."""
    from rich.console import Console

    from reports.terminal import tables

    def on(cpu: str, method: str, seed: int, step_s: float):
        r = run(method, bits(40, set(range(30))), seed=seed, step_s=step_s)
        return r.model_copy(update={"environment": {"cpu_model": cpu, "torch_threads": 2}})

    fast = [on("EPYC", "a", s, 0.1) for s in (0, 1, 2)]
    slow_here = [on("EPYC", "b", s, 0.3 + 0.001 * s) for s in (0, 1, 2)]
    slow_there = [on("Xeon", "b", s, 0.3 + 0.001 * s) for s in (0, 1, 2)]
    sigma = stats.run_to_run_sigma([fast, slow_here])
    assert stats.step_time_verdict(fast, slow_here, *sigma).significant
    v = stats.step_time_verdict(fast, slow_there, *sigma)
    assert not v.significant and v.unjudged == "machines"
    out = Console(width=200, record=True)
    for part in tables(fast + slow_there):
        out.print(part)
    assert "warning: these runs come from 2 machines" in out.export_text()
    out = Console(width=200, record=True)
    for part in tables(fast + slow_here):
        out.print(part)
    assert "machines" not in out.export_text()


def test_the_summary_warns_when_its_runs_come_from_several_commits():
    from rich.console import Console

    from reports.terminal import tables

    def at(commit: str, method: str):
        r = run(method, bits(40, set(range(30))))
        return r.model_copy(update={"environment": {**r.environment, "git_commit": commit}})

    def text(records):
        out = Console(width=200, record=True)
        for part in tables(records):
            out.print(part)
        return out.export_text()

    assert "warning: these runs come from 2 commits (aaaaaaaaaa, bbbbbbbbbb)" in text(
        [at("a" * 40, "lora"), at("b" * 40, "full")]
    )
    assert "commits" not in text([at("a" * 40, "lora"), at("a" * 40, "full")])


def test_a_memory_difference_under_ten_percent_is_given_as_a_share_not_as_1_00x():
    """A 29 KiB difference on 52 MiB read `(1.00×)` in the headline: true to two decimals, and no help."""

    def peaked(method, peak):
        r = run(method, "01")
        return r.model_copy(update={"training": r.training.model_copy(update={"peak_live_tensor_bytes": peak})})

    for other, size in ((54_250_000 + 29_900, "0.055% less"), (2 * 54_250_000, "2.00×")):
        cs = headline.configs([peaked("lora", 54_250_000), peaked("qalora", other)])[("m", "t")]
        best = {b.axis: b for b in headline.best_per_axis(cs)}["peak memory"]
        assert best.margin.endswith(f"less than qalora/default ({size})"), best.margin


def test_a_loss_beyond_noise_is_marked_as_a_loss_not_with_a_check():
    """12 steps of full fine-tuning took MiniLM from 0.560 to 0.480 on 200 snippets, beyond noise: the summary
    read "-0.080 ✓", a check beside a loss."""
    from rich.console import Console

    from reports.terminal import tables

    def trained(method: str, before: str, after: str):
        r = run(method, after)
        ev = r.eval_after.model_copy(update={"accuracy": before.count("1") / len(before), "correct": before})
        return r.model_copy(update={"eval_before": ev})

    worse = trained("full", bits(100, set(range(60))), bits(100, set(range(20))))
    better = trained("lora", bits(100, set(range(20))), bits(100, set(range(60))))
    same = trained("qlora", bits(100, set(range(20))), bits(100, set(range(21))))
    out = Console(width=200, record=True)
    for part in tables([worse, better, same]):
        out.print(part)
    rows = {
        line.split()[0]: line
        for line in out.export_text().splitlines()
        if line.split()[:1] in (["full"], ["lora"], ["qlora"])
    }
    assert "-0.400 ✗" in rows["full"] and "+0.400 ✓" in rows["lora"] and "+0.010 ≈" in rows["qlora"]


def test_compare_gives_a_change_too_small_for_a_percentage_in_its_unit():
    """An export 110 bytes larger (the task's label names in config.json) read "+0.0%; ▲ larger": now "+110 bytes"."""
    from reports.compare import _cell_text

    old = run("a", "1100").model_copy(update={"export_bytes": 90_000_000})
    new = old.model_copy(update={"export_bytes": 90_000_110})
    text = _cell_text("exports", old, new, True, True, ())
    assert "(+110 bytes; ▲ larger (exact, same seed and data))" in text, text
    bigger = new.model_copy(update={"export_bytes": 99_000_000})
    assert "(+10.0%; ▲ larger" in _cell_text("exports", old, bigger, True, True, ())


def test_two_cpus_that_share_a_name_are_two_machines():
    """Zen 1 (family 23 model 1) and Zen 2 (family 23 model 49) are both "AMD EPYC", AVX2, bf16 emulated: their
    step times never compare, and a row names the family and model."""
    env = {"cpu_model": "AMD EPYC", "cpu_isa": "AVX2", "native_bf16": False, "torch_threads": 2}
    zen1 = [
        run("a", "1100", seed=s).model_copy(update={"environment": {**env, "cpu_family_model": "family 23 model 1"}})
        for s in (0, 1)
    ]
    zen2 = [
        run("b", "1100", seed=s).model_copy(update={"environment": {**env, "cpu_family_model": "family 23 model 49"}})
        for s in (0, 1)
    ]
    assert stats.hardware_of(zen1[0]) == "AMD EPYC family 23 model 1 · AVX2 · bf16 not native · 2 threads"
    assert stats.step_time_verdict(zen1, zen2, 0.05, 2).why == "measured on different machines: not judged"
    assert stats.step_time_verdict(zen1, zen1, 0.05, 2).why != "measured on different machines: not judged"
