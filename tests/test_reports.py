"""Report formats and comparisons from real (tiny) runs."""

import csv
import io
import json
import re
import subprocess
import sys

import pytest

from harness.cell.run import run_cell
from harness.driver.cli import main
from harness.records import label_ids, read_current, read_record, write_record
from tests.conftest import ROOT, cells


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    d = tmp_path_factory.mktemp("r")
    for cfg in cells(methods=[{"method": "lora"}, {"method": "full"}]):
        run_cell(cfg.model_copy(update={"export": False}), d)
    return d


def rec_cpu(results) -> str:
    """The CPU as the report names it: model name, then family and model (AMD EPYC is Zen 1 to Zen 5 alike)."""
    env = read_record(next((results / "records").glob("*.json"))).environment
    return " ".join(x for x in (env["cpu_model"], env["cpu_family_model"]) if x)


def test_markdown_csv_json(results, capsys):
    assert main(["report", str(results), "--format", "md"]) == 0
    md = capsys.readouterr().out
    # first the summary's headline, as published: each configuration over its seeds, interval, verdicts, legend
    caption, _, rest = md.partition("\n\n")
    assert caption.startswith("**tiny-bert · rotten_tomatoes · ") and "test examples · 1 seed(s) · fp32**" in caption
    headline, _, rest = rest.partition("\n\n")
    assert headline.startswith(
        "| method | trains | peak | step | accuracy \\[95% CI\\] | gain | vs the most accurate |"
    )
    assert headline.count("\n| lora |") + headline.count("\n| full |") == 2 and ("| +" in headline or "| -" in headline)
    assert headline.count(" ms (IQR ") == 2  # a figure to publish carries its spread
    legend, _, md = rest.partition("\n\n")
    while legend.startswith("> **warning:** "):  # 4 steps of a tiny model: it may give every example one label
        legend, _, md = md.partition("\n\n")
    assert legend.startswith("_trains: the share of parameters")
    tuning, _, md = md.partition("\n\n")  # how the hyperparameters were chosen: by hand here
    assert tuning.startswith("_Every configuration ran at hand-set hyperparameters (the suite has no \\`tune:\\`")
    head, _, table = md.partition("\n\n")
    table, _, after = table.partition("\n\n")
    assert head.startswith("model: **tiny-bert** · task: **rotten_tomatoes** · seed: **0** · status: **ok**")
    assert table.startswith("| method |") and table.count("\n| lora") + table.count("\n| full") == 2
    assert "| model |" not in table and "e+0" not in table and "e-0" not in table  # no exponents in a table
    assert "**Each label's recall · tiny-bert · rotten_tomatoes**" in after  # then each label's recall
    assert main(["report", str(results), "--format", "csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert {r["method"] for r in rows} == {"lora", "full"} and all(float(r["accuracy_after"]) >= 0 for r in rows)
    assert main(["report", str(results), "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    full = next(d for d in data if d["method"] == "full")
    assert full["trainable_params"] == full["total_params"]
    assert all(d["peak_kind"] == "CPU live tensors" for d in data)
    for r in read_current(results)[0]:  # each prediction kept beside the right label: right where `correct` says
        truth, predicted = label_ids(r.task_info["test_label_ids"]), label_ids(r.eval_after.predicted)
        assert [int(c) for c in r.eval_after.correct] == [int(p == t) for p, t in zip(predicted, truth, strict=True)]
        assert len(predicted) == r.eval_after.examples
        row = next(d for d in data if d["method"] == r.method)  # and each label's recall, by name
        right = [sum(p == t == k for p, t in zip(predicted, truth, strict=True)) for k in (0, 1)]
        assert [row["recall_rotten"], row["recall_fresh"]] == [right[k] / truth.count(k) for k in (0, 1)]
    # pooled with rows from other suites or machines, a row still says how it trained and where
    assert {(d["steps"], d["train_dtype"], d["steps_skipped_by_loss_scaling"]) for d in data} == {(4, "float32", None)}
    assert {(d["batch_size"], d["grad_accum"], d["max_seq_len"]) for d in data} == {(8, 1, 32)}  # the budget
    assert all(isinstance(d["test_inputs_cut"], int) and isinstance(d["train_inputs_cut"], int) for d in data)
    assert all(d["hardware"].startswith(data[0]["hardware"][:8]) and 0 < d["mfu"] < 1 for d in data)


def test_html_report_written(results, capsys):
    assert main(["report", str(results)]) == 0
    path = capsys.readouterr().out.strip()
    html = open(path).read()
    assert html.startswith("<!DOCTYPE html>") and "Plotly.newPlot" in html and html.count('class="plot"') == 6
    assert "ran at <b>hand-set hyperparameters</b>" in html  # no tune: block, and the report says so
    embedded = len(html)
    assert main(["report", str(results), "--plotly", "cdn", "-o", str(results / "cdn.html")]) == 0
    cdn = (results / "cdn.html").read_text()
    assert '<script src="https://cdn.plot.ly/plotly-' in cdn and len(cdn) < embedded - 3_000_000
    import torch

    env = read_record(next((results / "records").glob("*.json"))).environment
    caps = "".join(f" · {k}={v}" for k, v in (env.get("isa_caps") or {}).items())  # ISA caps set to test: named
    assert f"Hardware: <b>{rec_cpu(results)} · {torch.backends.cpu.get_cpu_capability()}{caps} · bf16 " in html


def test_reading_results_never_imports_torch(results):
    """`ftbench report` and `ftbench summary` read records: importing torch would cost them 1.5 s of their 3
    (harness/measure/memory.py's categories and the hardware line were the ways in)."""
    code = (
        "import sys; from harness.driver.cli import main; rc = main(sys.argv[1:]); "
        "sys.stderr.write(f'torch imported: {\"torch\" in sys.modules}'); sys.exit(rc)"
    )
    for args in (["report", str(results), "-o", str(results / "light.html")], ["summary", str(results)]):
        done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=ROOT)
        assert done.returncode == 0 and done.stderr.endswith("torch imported: False"), done.stderr[-2000:]
    assert "Hardware: <b>" in (results / "light.html").read_text()


def test_compare_reports_deltas_and_environment_changes(results, tmp_path, capsys):
    new = tmp_path / "new"
    for p in (results / "records").glob("*.json"):
        rec = read_record(p)
        env = {**rec.environment, "versions": {**rec.environment["versions"], "torch": "9.9.9"}}
        write_record(
            new,
            rec.model_copy(
                update={
                    "training": rec.training.model_copy(update={"tokens_per_s": rec.training.tokens_per_s * 2}),
                    "environment": env,
                }
            ),
        )
    assert main(["compare", str(results), str(new), "--format", "json"]) == 0
    out = json.loads(capsys.readouterr().out)
    tps = [r for r in out["rows"] if r["metric"] == "tokens_per_s"]
    assert len(tps) == 2 and all(r["relative"] == pytest.approx(1.0) for r in tps)
    assert any(w.startswith("warning: environments differ: torch") for w in out["warnings"])
    assert main(["compare", str(results), str(new)]) == 0
    md = capsys.readouterr().out
    assert re.search(r"warning: environments differ: torch: \\\['[^']+'\\\] → \\\['9\.9\.9'\\\]", md), md  # no link


def _relabelled(results, out, **update):
    for p in (results / "records").glob("*.json"):
        rec = read_record(p)
        write_record(out, rec.model_copy(update={k: v(rec) if callable(v) else v for k, v in update.items()}))
    return out


def test_compare_says_a_config_differs_and_judges_nothing_there(results, tmp_path, capsys):
    """Two dirs differing only in `steps`: the output says so, per cell and above the table."""

    def more_steps(rec):
        return {**rec.config, "train": {**rec.config["train"], "steps": rec.config["train"]["steps"] + 10}}

    new = _relabelled(results, tmp_path / "new", config=more_steps)
    steps = read_record(next((results / "records").glob("*.json"))).config["train"]["steps"]
    change = f"train.steps: {steps} → {steps + 10}"
    assert main(["compare", str(results), str(new)]) == 0
    md = capsys.readouterr().out
    assert f"warning: config differs in 2 cell(s), not judged: {change}" in md
    rows = [line for line in md.splitlines() if line.startswith("| lora") or line.startswith("| full")]
    assert len(rows) == 2 and all(f"differs, not judged: {change}" in r for r in rows)
    assert not any(w in md for w in ("better", "worse", "within noise"))


def test_compare_on_equal_configs_marks_what_is_within_noise(results, tmp_path, capsys):
    """Same configs: a change of two test answers is within noise; forty is beyond it (McNemar on the same
    examples); step time without repeated runs is not judged; md escapes HTML and pipes."""

    def answers(flip):  # the first `flip` wrong answers made right
        def f(rec):
            bits = list(rec.eval_after.correct)
            for i in [i for i, b in enumerate(bits) if b == "0"][:flip]:
                bits[i] = "1"
            k = bits.count("1")
            return rec.eval_after.model_copy(update={"correct": "".join(bits), "accuracy": k / len(bits)})

        return f

    def rows_of(md):
        return [line for line in md.splitlines() if line.startswith(("| lora", "| full"))]

    far = _relabelled(results, tmp_path / "far", eval_after=answers(40))
    assert main(["compare", str(results), str(far)]) == 0
    rows = rows_of(capsys.readouterr().out)
    assert len(rows) == 2 and all("▲ better, p = " in r.split(" | ")[1] for r in rows), rows
    # one run per cell: step time is never judged (for lack of repeats, or because the machine was busy)
    assert all("not judged" in r.split(" | ")[3] and "better" not in r.split(" | ")[3] for r in rows), rows
    near = _relabelled(results, tmp_path / "near", eval_after=answers(2))
    assert main(["compare", str(results), str(near)]) == 0
    rows = rows_of(capsys.readouterr().out)
    assert len(rows) == 2 and all("(+0.0" in r and "; within noise, p = " in r.split(" | ")[1] for r in rows), rows
    evil_old = _relabelled(results, tmp_path / "evil_old", variant="<b>|x</b>")
    evil_new = _relabelled(results, tmp_path / "evil_new", variant="<b>|x</b>")
    assert main(["compare", str(evil_old), str(evil_new)]) == 0
    md = capsys.readouterr().out
    # CommonMark backslash escapes: the renderer shows the text, opens no tag, and the pipe splits no cell
    assert not re.search(r"(?<!\\)<b>", md) and md.count("\\<b>\\|x\\</b>") == 2, md


def test_report_of_a_non_results_dir_is_a_user_error(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "no records/ folder" in capsys.readouterr().err


def test_pareto_frontier_is_per_task(results):
    """Accuracies of different tasks do not compare: each (model, task) gets its own series and frontier."""
    from reports.figures import pareto

    recs = [read_record(p) for p in sorted((results / "records").glob("*.json"))]
    other = [
        r.model_copy(update={"task": "piqa", "eval_after": r.eval_after.model_copy(update={"accuracy": 0.99})})
        for r in recs
    ]
    one = pareto(recs)
    two = pareto(recs + other)
    assert len(one.data) == 2 and one.data[0].name == "runs"
    assert len(two.data) == 4 and {t.name for t in two.data[::2]} == {"tiny-bert · rotten_tomatoes", "tiny-bert · piqa"}
    # the piqa runs' 0.99 must not push the rotten_tomatoes runs off their own frontier
    assert len(two.data[1].x) >= 1 and two.data[1].legendgroup == "tiny-bert · rotten_tomatoes"


def test_figures_of_two_models_and_two_tasks_never_merge_runs(results):
    """Runs of different (model, task) with the same method/variant and seed: one bar each, no stacking; the seed
    plot and its noise sentences keep tasks apart; the frontier line has a visible colour of its own series."""
    from reports.figures import CATEGORY_COLORS, memory_breakdown, pareto, seed_spread, throughput

    base = [read_record(p) for p in sorted((results / "records").glob("*.json"))]
    recs = []
    for model in ("tiny-bert", "other-model"):
        for task in ("rotten_tomatoes", "piqa"):
            for seed in (0, 1):
                for r in base:
                    acc = r.eval_after.accuracy + 0.01 * seed + (0.3 if task == "piqa" else 0.0)
                    after = r.eval_after.model_copy(update={"accuracy": acc})
                    recs.append(r.model_copy(update={"model": model, "task": task, "seed": seed, "eval_after": after}))
    for fig in (memory_breakdown(recs), throughput(recs)):
        xs = list(fig.data[0].x)
        assert len(xs) == len(set(xs)) == len(recs)  # one bar per run: nothing stacked onto another task's
        assert any("piqa" in x for x in xs) and any("other-model" in x for x in xs)
    mem = memory_breakdown(recs)
    assert all(bar.marker.color == CATEGORY_COLORS[bar.name.replace(" ", "_")] for bar in mem.data)
    fig, notes = seed_spread(recs)
    assert len(fig.data[0].x) == 8  # 2 models × 2 tasks × 2 methods
    assert notes and all(n.count("piqa") in (0, 2) and n.count("other-model") in (0, 2) for n in notes)
    par = pareto(recs)
    for points, frontier in zip(par.data[::2], par.data[1::2], strict=True):
        assert frontier.line.color == points.marker.color and "rgba(0,0,0,0)" not in frontier.line.color


def test_the_summary_fits_a_terminal_and_the_wide_one_keeps_every_column(results, tmp_path, capsys):
    """`ftbench summary`: one compact table (method, trains, peak, step, accuracy with its interval, gain,
    verdict) within 100 columns when the output is not a terminal; `--wide` keeps every column; a failed run is
    one line under the table, not a row of dashes."""
    from harness.records import make_record

    assert main(["summary", str(results)]) == 0
    out = capsys.readouterr().out
    lines = out.rstrip("\n").splitlines()
    assert max(len(line) for line in lines) <= 100, max(lines, key=len)
    for word in ("method", "trains", "peak", "accuracy [95% CI]", "gain", "vs the most accurate"):
        assert word in out
    rows = [line.split() for line in lines if line.split()[:1] in (["lora"], ["full"])]
    assert sorted(r[0] for r in rows) == ["full", "lora"] and all("[" in " ".join(r) for r in rows)
    assert "tokens/s" not in out and "peak RSS" not in out  # the wide table's columns
    assert main(["summary", str(results), "--wide"]) == 0
    wide = capsys.readouterr().out
    assert "tokens/s" in wide and "peak RSS" in wide and "optimizer" in wide

    d = tmp_path / "with_failure"
    (d / "records").mkdir(parents=True)
    for p in (results / "records").glob("*.json"):
        (d / "records" / p.name).write_text(p.read_text())
    cfg = cells(methods=[{"method": "qlora"}])[0]
    write_record(d, make_record(cfg, "failed", "RuntimeError: boom\ntraceback…", "2026-12-04T00:00:00+00:00", 1.0))
    assert main(["summary", str(d)]) == 0
    out = capsys.readouterr().out
    assert "failed: tiny-bert · rotten_tomatoes · qlora/default · seed 0: RuntimeError: boom" in out


def test_a_summary_of_several_seeds_keeps_each_configuration_on_one_line(results, tmp_path, capsys):
    """Three seeds: the accuracy cell gains its spread over seeds (mean ± sd [95% CI]) and the caption the seed
    count; each configuration is still one line of at most 100 columns, its verdict whole, even with the
    under-load mark on its step time (--jobs 2 folded "within noise (p = 0.009)" onto a second line)."""
    d = tmp_path / "seeds"
    (d / "records").mkdir(parents=True)
    for p in (results / "records").glob("*.json"):
        for seed in (0, 1, 2):
            rec = json.loads(p.read_text())
            rec["seed"] = rec["config"]["seed"] = seed
            rec["cell_id"] = rec["cell_id"].replace("__s0__", f"__s{seed}__")
            correct = list(rec["eval_after"]["correct"])
            correct[seed] = "1" if correct[seed] == "0" else "0"  # the seeds differ a little
            rec["eval_after"]["correct"] = "".join(correct)
            rec["eval_after"]["accuracy"] = correct.count("1") / len(correct)
            rec["contention"] = {"loaded": True, "concurrent_cells": 2}
            (d / "records" / f"{rec['cell_id']}.json").write_text(json.dumps(rec))
    assert main(["summary", str(d)]) == 0
    lines = capsys.readouterr().out.rstrip("\n").splitlines()
    assert max(len(line) for line in lines) <= 100, max(lines, key=len)
    assert "3 seed(s)" in lines[0] and "accuracy ± sd [95% CI]" in lines[1]
    rows = [line for line in lines if line.split()[:1] in (["lora"], ["full"])]
    assert len(rows) == 2
    for row in rows:
        assert re.search(r"\d\.\d{3} ± \d\.\d{3} \[\d\.\d{3}, \d\.\d{3}\]", row), row
        assert re.search(r"(most accurate|a tie|\))$", row.rstrip()), row  # the verdict not cut onto a next line
        assert "ms⚠" in row
    from reports.terminal import _p

    widest = max((_p(x / 10000) for x in range(1, 10001)), key=len)  # every p a verdict can carry
    assert len(f"within noise ({widest})") == 24, widest


def test_one_metric_catalogue_feeds_compare_the_explorer_the_sort_and_the_meanings(results):
    """Issue 28: the metric catalogue (reports/metrics.py) is defined once; compare's rows, the page's explorer,
    the run table's numeric sort and the column meanings read it instead of keeping copies."""
    from reports import compare, explore, html, summary
    from reports.metrics import BY_COLUMN, BY_KEY, shown

    recs = [read_record(p) for p in sorted((results / "records").glob("*.json"))]
    for r in recs:
        assert {k: f(r) for k, f in compare.METRICS.items()} == {k: BY_KEY[k].get(r) for k in compare.METRICS}
        assert {k: f(r) for k, (_, f) in explore.METRICS.items()} == {k: shown(BY_KEY[k], r) for k in explore.METRICS}
        for col, m in BY_COLUMN.items():
            v = m.get(r)
            assert html._sort_value(r, col, "text") == ("" if v is None else str(v))
    assert all(c in BY_COLUMN for c in summary.NUMERIC)  # every numeric column is a catalogued metric
    assert all(summary.MEANINGS[c] == BY_COLUMN[c].meaning for c in summary.NUMERIC)
    assert compare.HIGHER_IS_BETTER == {
        "accuracy": True, "peak memory": False, "step time": False, "tokens/s": True, "trainable": False,
        "exports": False,
    }  # fmt: skip
    assert explore.METRICS["peak_bytes"][0] == "peak memory (as the run measured it), MiB"


def test_a_tiny_trainable_share_is_not_shown_as_zero():
    """Prompt tuning's 8 virtual tokens on SmolLM2-135M train 0.0034% of the parameters: two decimals read 0.00%."""
    from rich.console import Console

    from reports.metrics import BY_KEY, fmt_pct, text
    from reports.terminal import tables
    from tests.test_stats import run

    assert fmt_pct(0.0034) == "0.0034%" and fmt_pct(1.4689) == "1.47%" and fmt_pct(0.0) == "0.00%"
    assert fmt_pct(None) == "—" and text(BY_KEY["trainable_pct"], 0.0034) == "0.0034%"
    r = run("prompt", "0110").model_copy(update={"trainable_pct": 0.0034})
    out = Console(width=120, record=True)
    for part in tables([r]):
        out.print(part)
    assert "0.0034%" in out.export_text()


def test_compare_sees_an_auto_dtype_that_became_another_one():
    """The same suite (dtype: auto) is bf16 on one run and float32 on the other: not the same config, so the
    accuracy and timing are not judged as a change of code."""
    from reports import compare
    from tests.test_stats import run

    def ran(dtype: str):
        r = run("lora", "0110" * 25)
        why = {"value": dtype, "why": "…"}
        return r.model_copy(update={"config": {"train": {"dtype": "auto"}}, "resolved_dtypes": {"train.dtype": why}})

    rows, warns = compare.compare([ran("bfloat16")], [ran("float32")])
    assert rows and not any(r["same_config"] for r in rows)
    assert "warning: config differs in 1 cell(s), not judged: resolved_dtypes.train.dtype: bfloat16 → float32" in warns
    rows, warns = compare.compare([ran("float32")], [ran("float32")])
    assert all(r["same_config"] for r in rows) and not any("config differs" in w for w in warns)


def test_the_markdown_summary_keeps_its_legend_out_of_the_failures_list():
    from reports.terminal import to_markdown
    from tests.test_stats import run

    ok = run("lora", "0110" * 5)
    failed = run("full", "0110" * 5).model_copy(update={"status": "failed", "error": "ValueError: boom\ntrace"})
    text = to_markdown([ok, failed])
    assert "- failed: m · t · full/default · seed 0: ValueError: boom\n\n_trains: " in text
    assert "\n\n\n" not in to_markdown([ok])  # one blank line before the legend, not two


def test_a_record_counts_its_inputs_cut_to_max_seq_len(results):
    rec = read_record(next((results / "records").glob("*.json")))
    sizes = rec.task_info["split_sizes"]
    assert {s: v.examples for s, v in rec.input_lengths.items()} == {"train": sizes["train"], "test": sizes["test"]}
    test = rec.input_lengths["test"]
    assert 0 <= test.cut <= test.examples and test.tokens_max_uncut >= test.tokens_median_uncut > 0
    assert (test.cut > 0) == (test.tokens_max_uncut > rec.config["train"]["max_seq_len"])  # cut: one was longer
