"""Every file in tests/bad_suites/ is an invalid suite whose first line says `# expect: <message fragment>`.
Each must fail with exit code 2, one line on stderr naming the file and the fragment, and write nothing."""

from pathlib import Path

import pytest

from harness.driver.cli import main
from tests.conftest import ftbench

BAD = sorted((Path(__file__).parent / "bad_suites").glob("*.yaml"))


def expected(path: Path) -> str:
    first = path.read_text().splitlines()[0] if path.read_text() else ""
    if not first.startswith("# expect: "):  # the empty-file case carries its expectation in the filename table
        return {"empty.yaml": "the file is empty"}[path.name]
    return first.removeprefix("# expect: ")


@pytest.mark.parametrize("path", BAD, ids=[p.stem for p in BAD])
def test_bad_suite(path, tmp_path, capsys):
    results = tmp_path / "results"
    code = main(["run", str(path), "--results", str(results)])
    err = capsys.readouterr().err
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert str(path) in lines[0] and expected(path) in lines[0], lines[0]
    assert not results.exists()


def test_bad_suite_exit_code_and_no_traceback_in_real_process(tmp_path):
    out = ftbench("run", str(BAD[0]), "--results", str(tmp_path / "r"))
    assert out.returncode == 2
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_missing_suite_file(tmp_path, capsys):
    assert main(["run", str(tmp_path / "nope.yaml")]) == 2
    assert "no such suite file" in capsys.readouterr().err


def test_results_path_that_is_a_file(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    good = Path(__file__).parents[1] / "suites" / "tiny.yaml"
    assert main(["run", str(good), "--results", str(f)]) == 2
    assert "exists and is not a directory" in capsys.readouterr().err


@pytest.mark.parametrize(
    "content, message",
    [
        (bytes(range(128, 256)) * 4, "not UTF-8 text (byte 0); a suite is a YAML text file"),
        (b"[" * 2000, "cannot be read as YAML"),
        (b"a: !!python/object:os.system ls\n", "malformed YAML"),
    ],
    ids=["random_bytes", "nested_too_deep", "unsafe_tag"],
)
def test_unreadable_suite_files_are_one_line(tmp_path, capsys, content, message):
    path = tmp_path / "bad.yaml"
    path.write_bytes(content)
    code = main(["run", str(path), "--results", str(tmp_path / "results")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0] and str(path) in err[0], err
    assert not (tmp_path / "results").exists()  # nothing written


# Suites whose error needs no model skeleton: reported by the cheap checks, before torch is imported (the
# others need an architecture, a peft config class or the optimizer to say what is wrong).
CHEAP = [
    "unknown_method", "unknown_train_field", "negative_rank", "bad_variant", "bad_dtype", "bad_schedule",
    "duplicate_cell", "duplicate_seed", "empty", "malformed_yaml", "missing_methods", "negative_lr", "seed_huge",
    "qalora_bad_bits", "qalora_bad_group_size", "qlora_bad_blocksize", "qlora_bad_quant_type", "csv_missing_file",
    "missing_local_path", "forgetting_unknown_task", "batch_larger_than_split", "tune_inverted_range",
]  # fmt: skip


def test_a_typo_is_reported_before_torch_is_imported(tmp_path):
    """`ftbench run` checks the schema, the names, each method's config and the data first, without torch,
    transformers or peft: a typo is one line in a fraction of a second (bench/validation.py times it)."""
    import json
    import subprocess
    import sys

    from tests.conftest import ROOT

    code = f"""
import contextlib, io, json, sys
from harness.driver.cli import main
heavy = {{}}
for name in {CHEAP!r}:
    with contextlib.redirect_stderr(io.StringIO()):
        rc = main(["run", "tests/bad_suites/" + name + ".yaml", "--results", {str(tmp_path / "r")!r}])
    heavy[name] = (rc, [m for m in ("torch", "transformers", "peft", "sklearn") if m in sys.modules])
print(json.dumps(heavy))
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got == {name: [2, []] for name in CHEAP}, got


def test_every_shipped_suite_passes_the_checks_that_need_no_torch():
    """suites/ is what a reader runs first: each file's schema, names, method configs, data and tuning space hold
    (the model-fit phase is left to the tests that run them: it parses SmolLM2's GGUF file, seconds each)."""
    import yaml

    from harness.driver.suite import check_cheap

    shipped = sorted((Path(__file__).parents[1] / "suites").glob("*.yaml"))
    assert len(shipped) >= 10
    for path in shipped:
        check_cheap(yaml.safe_load(path.read_text()), str(path))
