"""Your own data for every kind of task: jsonl / csv files for multiple choice and generation, with the same
seeded split, validation errors and hashes as the built-in tasks, run on a tiny decoder and on SmolLM2."""

from __future__ import annotations

import csv
import json
import random

import pytest

from harness.driver.suite import parse_suite
from harness.schema import ConfigError, TaskSpec
from harness.tasks.builtin import load_task
from tests.conftest import run_cli, tiny_suite

COLOURS = ["red", "green", "blue", "yellow", "black", "white"]


def write_mc(path, n=60, answer_as=("index", "text", "letter")):
    """Questions with 3 or 4 choices; the right one given by its index, its text or its letter, in turn."""
    rng = random.Random(0)
    with open(path, "w") as fh:
        for i in range(n):
            choices = rng.sample(COLOURS, 3 + i % 2)
            right = rng.randrange(len(choices))
            how = answer_as[i % len(answer_as)]
            answer = {"index": right, "text": choices[right], "letter": "ABCD"[right]}[how]
            q = f"Item {i} is painted {choices[right]}. What colour is item {i}?"
            fh.write(json.dumps({"question": q, "options": choices, "answer": answer, "topic": f"t{i % 7}"}) + "\n")
    return path


def write_generation(path, n=60):
    rng = random.Random(1)
    with open(path, "w") as fh:
        for _ in range(n):
            a, b = rng.randrange(10), rng.randrange(10)
            fh.write(json.dumps({"prompt": f"What is {a} plus {b}?", "reference": str(a + b)}) + "\n")
    return path


MC = {"kind": "multiple_choice", "columns": {"text": "question", "choices": "options", "label": "answer"}}
GEN = {"kind": "generation", "columns": {"text": "prompt", "answer": "reference"}, "max_new_tokens": 4}


def test_multiple_choice_file_loads_with_index_text_or_letter_answers(tmp_path):
    path = write_mc(tmp_path / "mc.jsonl")
    spec = TaskSpec(name="jsonl", path=str(path), **MC)
    data = load_task(spec)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    by_q = {r["question"]: r for r in rows}
    for x in data.train + data.validation + data.test:
        r = by_q[x.text]
        assert list(x.choices) == r["options"] and r["question"].split("painted ")[1].startswith(x.choices[x.label])
    assert data.kind == "multiple_choice" and data.labels == ["A", "B", "C", "D"]
    assert len(data.train) + len(data.validation) + len(data.test) == 60
    again = load_task(spec)
    assert again.info()["examples_sha256"] == data.info()["examples_sha256"]  # the same seeded split
    other = load_task(spec.model_copy(update={"split_seed": 1}))
    assert other.info()["examples_sha256"]["test"] != data.info()["examples_sha256"]["test"]


def test_numeric_choices_given_by_their_text_are_read_as_texts(tmp_path):
    """Answers that are numbers among numeric choices: "24" of ["21", "25", "24"] was refused (index 24 does not
    exist), and "2" of ["1", "2", "3"] was silently read as index 2, the wrong choice."""
    rng = random.Random(2)
    path = tmp_path / "sums.jsonl"
    with open(path, "w") as fh:
        for i in range(60):
            a, b = rng.randrange(4), rng.randrange(1, 20)
            choices = [str(a + b + d) for d in rng.sample([-2, -1, 0, 1, 2], 3 if 0 < a + b < 3 else 4)]
            choices = choices if str(a + b) in choices else [*choices[:-1], str(a + b)]
            fh.write(json.dumps({"question": f"{i}: {a} + {b}?", "options": choices, "answer": str(a + b)}) + "\n")
    data = load_task(TaskSpec(name="jsonl", path=str(path), **MC))
    examples = data.train + data.validation + data.test
    assert len(examples) == 60
    for x in examples:
        a, b = x.text.split(": ")[1].rstrip("?").split(" + ")
        assert x.choices[x.label] == str(int(a) + int(b)), (x.text, x.choices, x.label)
    right = [int(x.choices[x.label]) for x in examples]
    assert any(0 <= n < len(x.choices) and n != x.label for n, x in zip(right, examples, strict=True))  # ambiguous


def test_choices_in_several_csv_columns_and_a_grouped_split(tmp_path):
    path = tmp_path / "mc.csv"
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["q", "a", "b", "c", "right", "topic"])
        for i in range(40):
            w.writerow([f"q{i}", "x", "y", "z" if i % 2 else "", "y", f"g{i % 5}"])
    cols = {"text": "q", "choices": ["a", "b", "c"], "label": "right", "group": "topic"}
    data = load_task(TaskSpec(name="csv", path=str(path), kind="multiple_choice", columns=cols))
    assert {len(x.choices) for x in data.train} == {2, 3}  # an empty cell is no choice
    assert all(x.label == 1 for x in data.train)
    groups = [{x.group for x in s} for s in (data.train, data.validation, data.test)]
    assert not (groups[0] & groups[2]) and not (groups[0] & groups[1])


def test_generation_file_loads(tmp_path):
    data = load_task(TaskSpec(name="jsonl", path=str(write_generation(tmp_path / "g.jsonl")), **GEN))
    assert data.kind == "generation" and all(x.answer and x.answer.isdigit() for x in data.test)
    assert data.prompt == "Question: {text}\nAnswer:"


@pytest.mark.parametrize(
    "task, message",
    [
        ({"kind": "multiple_choice", "columns": {"text": "question", "label": "answer"}}, r"columns\.choices: a "),
        ({"kind": "generation", "columns": {"text": "prompt"}}, r"columns\.answer: a generation task needs it"),
        ({"kind": "generation", "columns": {"text": "p", "answer": "r", "label": "x"}}, r"columns\.label: not used"),
        ({"kind": "riddles", "columns": {"text": "p"}}, r"tasks\[0\]\.kind: .*multiple_choice"),
    ],
)
def test_task_spec_errors_name_the_field(tmp_path, task, message):
    path = write_generation(tmp_path / "g.jsonl")
    suite = tiny_suite(models=["tiny-llama"], tasks=[{"name": "jsonl", "path": str(path), **task}])
    with pytest.raises(ConfigError, match=message):
        parse_suite(suite, "s.yaml")


def test_row_errors_name_the_file_row_and_column(tmp_path):
    path = write_mc(tmp_path / "mc.jsonl", n=5)
    lines = path.read_text().splitlines()
    bad = json.loads(lines[3]) | {"answer": "purple"}
    path.write_text("\n".join(lines[:3] + [json.dumps(bad)] + lines[4:]) + "\n")
    with pytest.raises(ConfigError, match=r"mc\.jsonl: row 4: column 'answer' = 'purple' is neither"):
        load_task(TaskSpec(name="jsonl", path=str(path), **MC))
    (tmp_path / "broken.jsonl").write_text('{"question": "q"}\n[1, 2]\n')
    with pytest.raises(ConfigError, match=r"broken\.jsonl: line 2 is not a JSON object"):
        load_task(TaskSpec(name="jsonl", path=str(tmp_path / "broken.jsonl"), **MC))


def _labelled(path, delimiter=",", label=lambda i, lab: lab):
    rows = [
        (f"this film is {w} indeed, take {i}", "pos" if w in ("good", "great") else "neg")
        for i, w in enumerate(["good", "bad", "great", "awful"] * 20)
    ]
    with open(path, "w", newline="") as f:
        w = csv.writer(f, delimiter=delimiter)
        w.writerow(["review", "verdict"])
        w.writerows((text, label(i, lab)) for i, (text, lab) in enumerate(rows))
    return TaskSpec(name="csv", path=str(path), columns={"text": "review", "label": "verdict"})


@pytest.mark.parametrize("delimiter", [";", "\t", "|"])
def test_a_semicolon_or_tab_separated_csv_reads_like_a_comma_separated_one(tmp_path, delimiter):
    """A European spreadsheet's "CSV" is ;-separated: its header read by commas is one column, never a task."""
    comma = load_task(_labelled(tmp_path / "c.csv"))
    other = load_task(_labelled(tmp_path / "o.csv", delimiter))
    assert other.labels == comma.labels == ["neg", "pos"]
    assert [(x.text, x.label) for x in other.test] == [(x.text, x.label) for x in comma.test]


def test_labels_are_read_without_surrounding_spaces_and_a_case_only_difference_is_refused(tmp_path):
    spaced = load_task(_labelled(tmp_path / "s.csv", label=lambda i, lab: f" {lab} " if i % 3 else lab))
    assert spaced.labels == ["neg", "pos"]
    with pytest.raises(ConfigError, match=r"labels 'NEG' and 'neg', which differ only in letter case"):
        load_task(_labelled(tmp_path / "u.csv", label=lambda i, lab: lab.upper() if i % 3 == 0 else lab))


@pytest.mark.real_model
def test_user_multiple_choice_and_generation_files_run_on_tiny_llama_and_smollm2(tmp_path, write_suite):
    mc, gen = write_mc(tmp_path / "mc.jsonl", n=120), write_generation(tmp_path / "gen.jsonl", n=120)
    suite = tiny_suite(
        models=["tiny-llama", "smollm2-135m"],
        tasks=[
            {"name": "jsonl", "path": str(mc), "eval_examples": 8, **MC},
            {"name": "jsonl", "path": str(gen), "eval_examples": 8, **GEN},
        ],
        train={"steps": 2, "batch_size": 4, "lr": 1e-3, "max_seq_len": 64, "timing_warmup_steps": 1},
        methods=[{"method": "lora", "config": {"r": 4}}],
        export=False,
    )
    out = run_cli("run", str(write_suite(suite)), "--results", str(tmp_path / "r"))
    assert out.returncode == 0, out.stderr[-2000:]
    recs = [json.loads(p.read_text()) for p in (tmp_path / "r" / "records").glob("*.json")]
    assert len(recs) == 4 and all(r["status"] == "ok" for r in recs), [r["error"] for r in recs]
    for r in recs:
        kind = r["task_info"]["kind"]
        assert kind in ("multiple_choice", "generation") and r["eval_after"]["examples"] == 8
        assert len(r["training"]["losses"]) == 2 and r["task_info"]["examples_sha256"]["test"]
        if kind == "generation":
            assert r["eval_after"]["generated_samples"]  # answers really were generated and compared
        else:
            assert r["eval_after"]["accuracy_norm"] is not None
    smol_mc = next(r for r in recs if r["model"] == "smollm2-135m" and r["task_info"]["kind"] == "multiple_choice")
    assert smol_mc["eval_before"]["accuracy"] >= 0.5  # the colour is in the question: a real LM reads it (chance ≤ 1/3)
