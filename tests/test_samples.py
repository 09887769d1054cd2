"""The report's generated answers (reports/samples.py): what each configuration wrote, before and after training,
marked as it was scored, so a score of 0 can be read as a model that cannot answer or as a reading that misses."""

import html

from harness.records import EvalMetrics
from reports import samples
from reports.html import render
from tests.test_stats import run


def _generating(method: str, seed: int, before: list[str], after: list[str], answers: list[str]):
    r = run(method, "0" * len(answers), seed=seed)

    def ev(texts):
        right = "".join("1" if t.split()[-1] == a else "0" for t, a in zip(texts, answers, strict=True))
        kept = [{"answer": a, "generated": t} for a, t in zip(answers, texts, strict=True)]
        return EvalMetrics(
            accuracy=right.count("1") / len(right), loss=1.0, examples=len(right), correct=right, generated_samples=kept
        )

    return r.model_copy(update={"eval_before": ev(before), "eval_after": ev(after)})


def test_each_configuration_shows_its_lowest_seeds_generations_before_and_after_marked_as_scored():
    answers = ["41", "7"]
    lora = _generating("lora", 1, ["3 + 38 = 41", "five"], ["41", "6"], answers)
    later = _generating("lora", 2, ["x", "y"], ["never shown", "z"], answers)
    full = _generating("full", 0, ["12", "7"], ["41", "7"], answers)
    page = render([later, lora, full], "", "s")
    assert samples.applies([lora]) and not samples.applies([run("full", "01")])
    section = page[page.index("<h2>Generated answers</h2>") :]
    assert "never shown" not in section and "lora/default: seed 1" in section and "full/default: seed 0" in section
    row0 = section[section.index("<td>0</td>") : section.index("<td>1</td>")]
    assert "<td>41</td>" in row0 and "✓ <code>&#x27;3 + 38 = 41&#x27;</code><br>→ ✓ <code>&#x27;41&#x27;" in row0
    assert "✗ <code>&#x27;12&#x27;</code>" in row0  # full's untrained answer, wrong
    assert "<h2>Generated answers</h2>" not in render([run("full", "01")], "", "s")  # no generation task


def test_answers_cut_by_max_new_tokens_are_a_warning_in_the_report_and_the_summary():
    from rich.console import Console

    from reports.terminal import tables

    r = _generating("lora", 0, ["36 + 38 =", "7"], ["74", "7"], ["74", "7"])
    cut = r.model_copy(
        update={
            "eval_before": r.eval_before.model_copy(update={"generations_cut": 1}),
            "config": {"task": {"max_new_tokens": 6}},
        }
    )
    line = "m · t · lora/default: 1 of 2 untrained answers ran into max_new_tokens (6) before a newline"
    assert samples.cut_warnings([cut])[0].startswith(line) and samples.cut_warnings([r]) == []
    assert line in render([cut], "", "s")
    out = Console(width=300, record=True)
    for part in tables([cut]):
        out.print(part)
    assert "warning: " + line in out.export_text()


def test_steps_skipped_by_fp16_loss_scaling_are_a_warning_in_the_summary_the_markdown_and_the_report():
    from rich.console import Console

    from reports.terminal import tables, to_markdown

    def fp16(r, skipped):
        scaled = {"loss_scales": [2.0**16] * 4, "skipped_steps": skipped, "losses": [0.7] * 4}
        return r.model_copy(update={"training": r.training.model_copy(update=scaled)})

    runs = [fp16(run("lora", "01", seed=0), [0]), fp16(run("lora", "01", seed=1), [0, 1]), run("full", "11")]
    line = "m · t · lora/default: 1–2 of 4 steps skipped by fp16 loss scaling (seed(s) 0, 1)"
    assert html.escape(line) in render(runs, "", "s") and line in to_markdown(runs)
    out = Console(width=300, record=True)
    for part in tables(runs):
        out.print(part)
    assert "warning: " + line in out.export_text()
    assert "skipped by fp16" not in render([fp16(run("lora", "01"), []), run("full", "11")], "", "s")  # none skipped


def test_the_dtype_column_says_what_ran_the_compute_dtype_where_it_differs_and_the_skipped_steps():
    from reports.summary import dtype_label, to_markdown

    def ran(train, compute=None, skipped=()):
        dtypes = {"train.dtype": {"choice": "auto", "value": train, "why": ""}}
        if compute:
            dtypes["method.compute_dtype"] = {"choice": "auto", "value": compute, "why": ""}
        r = run("qlora", "01")
        training = r.training.model_copy(update={"skipped_steps": list(skipped), "loss_scales": [1.0] * 4})
        return r.model_copy(update={"resolved_dtypes": dtypes, "training": training})

    assert dtype_label(run("full", "01")) == "—"  # an old record: no dtype kept
    assert dtype_label(ran("bfloat16", "bfloat16")) == "bf16"
    assert dtype_label(ran("float32", "bfloat16")) == "fp32 · compute bf16"
    assert dtype_label(ran("float16", "float16", [0])) == "fp16 · 1 step skipped"
    assert dtype_label(ran("float16", skipped=[0, 3])) == "fp16 · 2 steps skipped"
    assert "dtype: **bf16**" in to_markdown([ran("bfloat16"), ran("bfloat16")])  # the same in every row: said once


def test_a_model_that_gives_every_example_one_label_is_a_warning_naming_the_labels_true_share():
    """20 steps of MiniLM on Rotten Tomatoes scored 0.530 by calling every snippet 'fresh' (53% are): the
    summary, the markdown and the report say so; a model right at the label's true share is not flagged."""
    from rich.console import Console

    from reports.caveats import one_label_warnings
    from reports.terminal import tables, to_markdown

    truth = [1] * 53 + [0] * 47
    info = {"kind": "classification", "labels": ["rotten", "fresh"], "test_label_ids": ",".join(map(str, truth))}

    def predicting(method, seed, predicted):
        r = run(method, "".join("1" if p == t else "0" for p, t in zip(predicted, truth, strict=True)), seed=seed)
        return r.model_copy(
            update={
                "task_info": info,
                "eval_after": r.eval_after.model_copy(update={"predicted": ",".join(map(str, predicted))}),
            }
        )

    collapsed = [predicting("lora", s, [1] * 100) for s in (0, 1)]
    near = predicting("qlora", 0, [1] * 96 + [0] * 4)  # 96% 'fresh': 43 points above its true share
    fine = predicting("full", 0, truth)  # right on every example: 53% 'fresh', as the truth
    runs = [*collapsed, near, fine]
    line = "m · t · lora/default: predicts 'fresh' for 100% of the 100 test examples, of which 53% are 'fresh' "
    line += "(seed(s) 0, 1)"
    warnings = one_label_warnings(runs)
    assert (
        len(warnings) == 2 and warnings[0].startswith(line) and "qlora/default: predicts 'fresh' for 96%" in warnings[1]
    )
    assert html.escape(line) in render(runs, "", "s") and line in to_markdown(runs)
    out = Console(width=400, record=True)
    for part in tables(runs):
        out.print(part)
    assert "warning: " + line in out.export_text()
    mc = {**info, "kind": "multiple_choice", "labels": []}
    picks_first = predicting("lora", 0, [0] * 100).model_copy(
        update={"task_info": {**mc, "test_label_ids": ",".join(["1"] * 100)}}
    )
    assert "predicts choice 1 for 100%" in one_label_warnings([picks_first])[0]
    assert one_label_warnings([fine, predicting("lora", 0, [1] * 60 + [0] * 40)]) == []  # 60%: not one label


def test_each_labels_recall_is_the_share_of_its_examples_given_that_label_mean_over_seeds():
    import numpy as np

    from reports import labels
    from reports.stats import wilson, wilson_over_seeds

    truth = [0] * 4 + [1] * 4 + [2] * 2  # three topics, the last rarer
    info = {"kind": "classification", "labels": ["sport", "tech", "<b>arts</b>"]}
    info["test_label_ids"] = ",".join(map(str, truth))

    def predicting(method, seed, predicted):
        r = run(method, "".join("1" if p == t else "0" for p, t in zip(predicted, truth, strict=True)), seed=seed)
        ev = r.eval_after.model_copy(update={"predicted": ",".join(map(str, predicted))})
        return r.model_copy(update={"task_info": info, "eval_after": ev})

    a = predicting("lora", 0, [0, 0, 0, 1, 1, 1, 1, 1, 2, 0])  # sport 3/4, tech 4/4, arts 1/2
    b = predicting("lora", 1, [0, 0, 0, 0, 1, 1, 0, 0, 0, 0])  # sport 4/4, tech 2/4, arts 0/2
    assert labels.per_label(a) == [(0.75, 0.4), (1.0, 0.5), (0.5, 0.1)]
    page = labels.render([a, b])
    assert "<th>&lt;b&gt;arts&lt;/b&gt; (2, 20%)</th>" in page  # each label's own count and share, escaped
    row = page[page.index("lora/default") :]
    # sport: right on 3 of 4 (seed 0) and 4 of 4 (seed 1); its interval is over its 4 examples, seeds averaged
    lo, hi = wilson_over_seeds(np.array([1, 1, 1, 0.5]), 2)
    assert f'<td class="num">0.88 <small>[{lo:.2f}, {hi:.2f}] (60%)</small></td>' in row and "(2 seeds)" in row
    lo, hi = wilson(0.5, 2)  # one seed: Wilson's interval over the label's 2 examples
    assert f'<td class="num">0.50 <small>[{lo:.2f}, {hi:.2f}] (10%)</small></td>' in labels.render([a])
    assert labels.applies([a]) and not labels.applies([run("full", "01")])
    mc = a.model_copy(update={"task_info": {**info, "kind": "multiple_choice"}})
    assert not labels.applies([mc])  # a choice's index is not a label
    assert "<h2>Each label's recall</h2>" in render([a, b], "", "s")
    many = [k % 10 for k in range(40)]  # ten labels: a row per label, a column per configuration
    wide = a.model_copy(
        update={
            "task_info": {
                "kind": "classification",
                "labels": [f"l{k}" for k in range(10)],
                "test_label_ids": ",".join(map(str, many)),
            },
            "eval_after": a.eval_after.model_copy(update={"predicted": ",".join(map(str, many))}),
        }
    )
    page = labels.render([wide])
    assert "<th>label</th><th>lora/default</th>" in page and page.count("<tr><td>l") == 10


def test_inputs_cut_to_max_seq_len_are_a_warning_in_the_summary_the_markdown_and_the_report():
    from rich.console import Console

    from harness.records import SplitInputs
    from reports.caveats import cut_input_warnings
    from reports.terminal import tables, to_markdown

    def reading(r, max_len, cut, status="ok"):
        split = SplitInputs(examples=184, cut=cut, tokens_median_uncut=423.5, tokens_max_uncut=1639)
        update = {"input_lengths": {"test": split}, "config": {"train": {"max_seq_len": max_len}}, "status": status}
        return r.model_copy(update=update)

    runs = [reading(run("lora", "01"), 128, 184), reading(run("full", "11"), 128, 184)]
    line = "m · t: inputs longer than max_seq_len 128 tokens, cut to it: 184 of 184 test (median length 424)"
    assert cut_input_warnings(runs) == [line + "; a model reads only what fits (raise train.max_seq_len to read more)"]
    assert html.escape(line) in render(runs, "", "s") and line in to_markdown(runs)
    out = Console(width=300, record=True)
    for part in tables(runs):
        out.print(part)
    assert "warning: " + line in out.export_text()
    longer = [runs[0], reading(run("full", "11"), 512, 0)]  # configurations that read other lengths are named
    assert cut_input_warnings(longer)[0].startswith("m · t · lora/default: inputs longer than max_seq_len 128 ")
    assert cut_input_warnings([reading(run("lora", "01"), 128, 1)]) == []  # under 1% of the split
    assert cut_input_warnings([reading(run("lora", "01"), 128, 184, status="failed")]) == []


def test_configurations_trained_on_different_budgets_are_a_warning():
    """A method's own `train: {steps: 30}` beside another's 12: the headline compares configurations, not methods
    at equal training, and says so; the same budget everywhere (other LRs) says nothing."""
    from harness.records import RunRecord
    from reports.caveats import budget_warnings, training_warnings
    from reports.terminal import to_markdown

    def trained(method: str, seed: int = 0, **train) -> RunRecord:
        budget = {"steps": 12, "batch_size": 16, "grad_accum": 1, "max_seq_len": 64, "lr": 1e-3, **train}
        return run(method, "01", seed=seed).model_copy(update={"config": {"train": budget}})

    runs = [trained("full"), trained("full", seed=1), trained("lora", steps=30), trained("qlora", steps=100)]
    line = (
        "m · t: configurations trained on different budgets — steps 12 (full/default), 30 (lora/default), "
        "100 (qlora/default): their accuracies compare these configurations, not the methods at equal training"
    )
    assert budget_warnings(runs) == [line] and line in training_warnings(runs) and line in to_markdown(runs)
    assert html.escape(line) in render(runs, "", "s")
    two = budget_warnings([trained("full"), trained("lora", batch_size=8, max_seq_len=128)])[0]
    assert "batch_size 8 (lora/default), 16 (full/default); max_seq_len 64 (full/default), 128 (lora/default)" in two
    assert budget_warnings([trained("full", lr=1e-5), trained("lora", lr=2e-3)]) == []  # learning rates: tuned
    failed = trained("lora", steps=30).model_copy(update={"status": "failed"})
    assert budget_warnings([trained("full"), failed]) == []


def test_an_untrained_start_away_from_the_base_models_is_a_warning_saying_where_training_left_it():
    """Prefix tuning's random prefix starts SmolLM2 at 0.450 where the base reads 0.790 zero-shot: a gain over that
    start is no gain over the base. A start within noise of the base (a quantized base) says nothing, nor does a
    suite without a configuration that starts as the base, nor a record from before ``starts_as_base``."""
    from reports.caveats import start_warnings, training_warnings
    from reports.terminal import to_markdown
    from tests.test_stats import bits

    def rec(method: str, before: int, after: int, starts: bool | None, seed: int = 0):
        untrained = EvalMetrics(accuracy=before / 100, loss=0.5, examples=100, correct=bits(100, set(range(before))))
        r = run(method, bits(100, set(range(after))), seed=seed)
        return r.model_copy(update={"eval_before": untrained, "starts_as_base": starts})

    lora, prefix, quantized = rec("lora", 79, 83, True), rec("prefix", 45, 53, False), rec("qlora", 78, 81, False)
    (line,) = start_warnings([lora, prefix, quantized])
    assert line.startswith("m · t · prefix/default: starts at 0.450 untrained, as its method prepared the model, ")
    assert "against the base model's 0.790 (lora/default untrained; 34 lost, 0 gained of 100 (p = " in line
    assert "beyond noise)): its gain is over its own start; trained, 0.530 against the base's 0.790: 26 lost" in line
    assert line in training_warnings([lora, prefix]) and line in to_markdown([lora, prefix])
    assert start_warnings([prefix, quantized]) == []  # no base to compare with
    assert start_warnings([lora.model_copy(update={"starts_as_base": None}), prefix]) == []
    assert start_warnings([lora, prefix, rec("prefix", 45, 53, False, seed=1)]) == []  # seed 1 has no base score
