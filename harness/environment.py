"""Where a record was produced: the machine, the libraries and the commit, enough to judge whether two records
are comparable. Shared by both processes (the cell records it; the driver's claims name the commit)."""

from __future__ import annotations

import os
import platform
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any


def _version(pkg: str) -> str | None:
    try:
        return version(pkg)
    except PackageNotFoundError:
        return None


def git(*args: str) -> str | None:
    """`git ARGS` in ftbench's own checkout: its output, or None where git or the checkout is missing."""
    try:
        out = subprocess.run(
            ["git", *args], cwd=Path(__file__).resolve().parent, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def environment() -> dict[str, Any]:
    """Where a record was produced: enough to judge whether two records are comparable."""
    from harness.libs import measurement_env
    from harness.measure.hardware import identity  # torch: only where a record is made, not where one is read

    dirty = git("status", "--porcelain")
    hw = identity()  # CPU model, ISA level, native bf16 (measured), threads, GPU: what decides speed
    env = {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_model": hw["cpu_model"],
        "cpu_family_model": hw.get("cpu_family_model"),
        "cpu_isa": hw["cpu_isa"],
        "cpu_bf16_flags": hw["cpu_bf16_flags"],
        "native_bf16": hw["native_bf16"],
        "bf16_speedup_vs_fp32": hw["bf16_speedup_vs_fp32"],
        "machine_key": hw["machine_key"],
        "isa_caps": hw.get("isa_caps"),  # oneDNN / MKL ISA caps set in the environment (None: none)
        "float32_matmul_precision": hw.get("float32_matmul_precision"),  # None: "highest", no TF32
        "cpu_count": os.cpu_count(),
        "torch_threads": hw["torch_threads"],
        "measurement_env": measurement_env(),  # allocator configuration and thread pools, as this run had them
        "gpu": hw["gpu"],
        "versions": {
            p: _version(p)
            for p in (
                "ftbench",
                "torch",
                "transformers",
                "peft",
                "bitsandbytes",
                "safetensors",
                "scikit-learn",
                "numpy",
            )
        },
        "git_commit": git("rev-parse", "HEAD"),
        "git_dirty": None if dirty is None else bool(dirty),
        "hf_hub_offline": os.environ.get("HF_HUB_OFFLINE"),
    }
    return env


def outside_settings(ident: dict[str, Any]) -> list[str]:
    """What was set from outside that changes matmul speed, as the hardware lines name it: ISA caps
    ('ONEDNN_MAX_CPU_ISA=AVX2'), an fp32 matmul precision other than "highest" (TF32)."""
    caps = [f"{k}={v}" for k, v in (ident.get("isa_caps") or {}).items()]
    precision = ident.get("float32_matmul_precision")
    return caps + ([f"fp32 matmul precision {precision}"] if precision else [])


def cpu_name(ident: dict[str, Any]) -> str:
    """The CPU's name with its family and model: "AMD EPYC" alone names Zen 1 and Zen 4 alike (2.5-4× apart)."""
    return " ".join(str(x) for x in (ident.get("cpu_model"), ident.get("cpu_family_model")) if x)


def describe(ident: dict[str, Any]) -> str:
    """One line: 'AMD EPYC family 23 model 1 · AVX2 · bf16 emulated (71× slower than fp32) · 2 threads' (here, not
    in harness/measure/hardware.py, so that a report names the machine without importing torch)."""
    s = ident.get("bf16_speedup_vs_fp32") or 0.0
    bf16 = (
        f"bf16 native ({s:.1f}× fp32)"
        if ident.get("native_bf16")
        else (f"bf16 emulated ({1 / s:.0f}× slower than fp32)" if 0 < s < 0.5 else f"bf16 not faster ({s:.2f}× fp32)")
    )
    cpu = cpu_name(ident)
    parts = [
        ident.get("gpu") or cpu,
        ident.get("cpu_isa"),
        *outside_settings(ident),
        bf16,
        f"{ident.get('torch_threads')} threads",
    ]
    return " · ".join(str(p) for p in parts if p)
