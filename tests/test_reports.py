"""Report formats and comparisons from real (tiny) runs."""

import csv
import io
import json

import pytest

from harness.cell import run_cell
from harness.cli import main
from harness.records import read_record, write_record
from tests.conftest import cells


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    d = tmp_path_factory.mktemp("r")
    for cfg in cells(methods=[{"method": "lora"}, {"method": "full"}]):
        run_cell(cfg.model_copy(update={"export": False}), d)
    return d


def rec_cpu(results) -> str:
    return read_record(next((results / "records").glob("*.json"))).environment["cpu_model"]


def test_markdown_csv_json(results, capsys):
    assert main(["report", str(results), "--format", "md"]) == 0
    md = capsys.readouterr().out
    assert md.startswith("| method |") and md.count("\n| lora") + md.count("\n| full") == 2
    assert main(["report", str(results), "--format", "csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert {r["method"] for r in rows} == {"lora", "full"} and all(float(r["accuracy_after"]) >= 0 for r in rows)
    assert main(["report", str(results), "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    full = next(d for d in data if d["method"] == "full")
    assert full["trainable_params"] == full["total_params"]
    assert all(d["peak_kind"] == "CPU live tensors" for d in data)


def test_html_report_written(results, capsys):
    assert main(["report", str(results)]) == 0
    path = capsys.readouterr().out.strip()
    html = open(path).read()
    assert html.startswith("<!DOCTYPE html>") and "Plotly.newPlot" in html and html.count('class="plot"') == 6
    embedded = len(html)
    assert main(["report", str(results), "--plotly", "cdn", "-o", str(results / "cdn.html")]) == 0
    cdn = (results / "cdn.html").read_text()
    assert '<script src="https://cdn.plot.ly/plotly-' in cdn and len(cdn) < embedded - 3_000_000
    import torch

    assert f"Hardware: <b>{rec_cpu(results)} · {torch.backends.cpu.get_cpu_capability()} · bf16 " in html


def test_compare_reports_deltas_and_environment_changes(results, tmp_path, capsys):
    new = tmp_path / "new"
    for p in (results / "records").glob("*.json"):
        rec = read_record(p)
        env = {**rec.environment, "versions": {**rec.environment["versions"], "torch": "9.9.9"}}
        write_record(new, rec.model_copy(update={"tokens_per_s": rec.tokens_per_s * 2, "environment": env}))
    assert main(["compare", str(results), str(new)]) == 0
    out = capsys.readouterr()
    tps = [line for line in out.out.splitlines() if "| tokens_per_s |" in line]
    assert len(tps) == 2 and all("+100.0%" in line for line in tps)
    assert "warning: environments differ: torch" in out.err


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
