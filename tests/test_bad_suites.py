"""Every file in tests/bad_suites/ is an invalid suite whose first line says `# expect: <message fragment>`.
Each must fail with exit code 2, one line on stderr naming the file and the fragment, and write nothing."""

from pathlib import Path

import pytest

from harness.cli import main
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
