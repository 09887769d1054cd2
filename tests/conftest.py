"""Shared helpers: tiny suites built in code, run in-process (fast) or through the real CLI (subprocess)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness.config import RunConfig, expand, parse_suite

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def tiny_suite(**over) -> dict:
    """A suite dict for tiny-bert on a small slice of Rotten Tomatoes; keyword args override top-level keys."""
    suite = {
        "name": "t",
        "models": ["tiny-bert"],
        "tasks": [{"name": "rotten_tomatoes", "train_examples": 128, "eval_examples": 64}],
        "train": {"steps": 4, "batch_size": 8, "lr": 1e-3, "max_seq_len": 32, "timing_warmup_steps": 1},
        "methods": [{"method": "lora", "config": {"r": 4}}],
        "seeds": [0],
        "timeout_s": 300,
    }
    suite.update(over)
    return suite


def cells(**over) -> list[RunConfig]:
    return expand(parse_suite(tiny_suite(**over), "<test>"))


def ftbench(*args: str, cwd: Path | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """The real command line, in a subprocess."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "harness", *args],
        cwd=cwd or ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


@pytest.fixture
def write_suite(tmp_path):
    import yaml

    def _write(data: dict, name: str = "suite.yaml") -> Path:
        p = tmp_path / name
        p.write_text(yaml.safe_dump(data))
        return p

    return _write
