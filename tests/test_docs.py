"""The README is a front door (issue 28): short, every link resolves, and its suite example is a suite ftbench
accepts. The code stays in files a reader can hold: none over 400 lines."""

from __future__ import annotations

import re
import shutil

import yaml

from tests.conftest import ROOT

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def test_the_readme_is_at_most_250_lines():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 250


def test_every_relative_link_in_the_readme_and_docs_resolves():
    broken = []
    for doc in DOCS:
        for target in LINK.findall(doc.read_text()):
            if "://" in target or target.startswith("mailto:"):
                continue
            if not (doc.parent / target).exists():
                broken.append(f"{doc.relative_to(ROOT)} → {target}")
    assert not broken, broken
    assert len(DOCS) >= 10  # the deep dives moved out of the README are there


def test_the_readmes_suite_example_is_accepted(tmp_path):
    from harness.driver.suite import parse_suite

    text = (ROOT / "README.md").read_text()
    (example,) = [b for b in re.findall(r"```yaml\n(.*?)```", text, re.S) if "name: my-comparison" in b]
    (tmp_path / "data").mkdir()
    rows = [
        f"review {i}: {'a fine film' if i % 2 else 'a dull one'},{'fresh' if i % 2 else 'rotten'}" for i in range(40)
    ]
    (tmp_path / "data" / "reviews.csv").write_text("review,verdict\n" + "\n".join(rows) + "\n")
    shutil.copy(ROOT / "tests" / "data" / "methods" / "bitfit.py", tmp_path / "bitfit.py")
    path = tmp_path / "suite.yaml"
    path.write_text(example)
    suite = parse_suite(yaml.safe_load(example), str(path))  # both phases: schema, names, data, model fit
    assert [m.method for m in suite.methods] == ["full", "lora", "qlora", "peft", "bitfit"]


def test_no_source_file_is_over_400_lines():
    long = [
        f"{p.relative_to(ROOT)}: {n}"
        for d in ("harness", "methods", "reports", "bench", "examples")
        for p in sorted((ROOT / d).rglob("*.py"))
        if (n := len(p.read_text().splitlines())) > 400
    ]
    assert not long, long


def test_every_ftbench_command_and_option_the_docs_name_exists():
    """A doc that names `ftbench report --format md` or `make bench` tells a reader to type it: each ftbench
    command that starts a code span or a line of a code block, each option after it, and each `make` target
    must exist."""
    import argparse

    from harness.driver.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    options = {name: set(p._option_string_actions) for name, p in sub.choices.items()}
    targets = set(re.findall(r"^([a-z][\w-]*):", (ROOT / "Makefile").read_text(), re.M))
    unknown, commands = [], 0
    for doc in DOCS:
        text = doc.read_text()
        blocks = re.findall(r"```.*?```", text, re.S)
        spans = re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", text, flags=re.S))
        for line in [x for b in blocks for x in b.splitlines()] + spans:
            if m := re.match(r"\s*(?:\$\s*)?(?:\S*/)?ftbench ([a-z]+)(.*)", line):
                command, rest = m.groups()
                commands += 1
                if command not in options:
                    unknown.append(f"{doc.name}: {line.strip()}")
                    continue
                rest = rest.split("#")[0]  # a comment after the command is prose
                unknown += [
                    f"{doc.name}: {line.strip()}"
                    for o in re.findall(r"(?<!\S)--[a-z][\w-]*", rest)
                    if o not in options[command]
                ]
            unknown += [
                f"{doc.name}: make {t}" for t in re.findall(r"^\s*make ([a-z][\w-]*)", line) if t not in targets
            ]
    assert not unknown, unknown
    assert commands > 20  # the check reads the docs' commands
