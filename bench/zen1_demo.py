"""The demo on the slow path, old code against new, back to back: an estimate of `make demo` on the Zen 1 EPYC.

Issue 27 timed 44c4c84's demo on 2 cores of a Zen 1 EPYC (family 23 model 1, AVX2 only): 696 s. There bf16 is
emulated, so ``dtype: auto`` and every ``compute_dtype: auto`` resolve to fp32. On an AVX-512 machine this runs
both demos with ATen's and oneDNN's AVX2 kernels (``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2``): ftbench's
own probe then finds bf16 emulated (about 3 GFLOP/s here) and takes the fp32 path everywhere, as on Zen 1; MKL's
matmuls are held to AVX2 too (``MKL_ENABLE_INSTRUCTIONS=AVX2``, since 2026-12-06). Each run gets an empty machine
cache, as on a fresh machine, and the order is ABBA because these machines drift. Each demo runs as
``python -m harness`` in its own checkout, with this venv unless the checkout has one.

    git worktree add /tmp/old 44c4c84
    python bench/zen1_demo.py --old /tmp/old

Zen 1 ≈ 696 s × (new / old). An estimate, not a measurement: the new code may scale differently from the old.
Each checkout runs its own demo: since 2026-12-07 the new one has three methods (QA-LoRA left it), the old four,
so the quotient is `make demo` against `make demo`, workload change included.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ZEN1_OLD_DEMO_S = 696.0  # 44c4c84's `make demo` on the Zen 1 EPYC (issue 27)
AVX2 = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
ROOT = Path(__file__).resolve().parents[1]


def run_demo(repo: Path, out: Path) -> tuple[float, dict[str, float]]:
    """One `ftbench run suites/quick.yaml` of ``repo``'s venv on AVX2 kernels with an empty cache: wall seconds
    and each method's test accuracy."""
    env = {**os.environ, **AVX2, "FTBENCH_CACHE_DIR": str(out.parent / f"{out.name}-cache")}  # empty, removed after
    own = repo / ".venv/bin/python"
    python = str(own) if own.exists() else sys.executable  # `-m harness` in cwd: the checkout's own code
    t0 = time.perf_counter()
    done = subprocess.run(
        [python, "-m", "harness", "run", "suites/quick.yaml", "--results", str(out)],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"{repo}: ftbench run failed\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    acc = {}
    for p in (out / "records").glob("*.json"):
        r = json.loads(p.read_text())
        acc[r["method"]] = r["eval_after"]["accuracy"]
    return wall, acc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--old", type=Path, required=True, help="a checkout of the old commit (its venv, if it has one)")
    args = ap.parse_args()
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    print(" · ".join(line.split(":", 1)[1].strip() for line in cpu.splitlines() if line.split(":")[0] in
                     ("Model name", "CPU family", "Model")))  # fmt: skip
    times: dict[str, list[float]] = {"old": [], "new": []}
    with tempfile.TemporaryDirectory() as tmp:
        for i, which in enumerate(("old", "new", "new", "old")):
            wall, acc = run_demo(args.old if which == "old" else ROOT, Path(tmp) / f"{i}-{which}")
            times[which].append(wall)
            print(f"{which}: {wall:.1f} s  accuracies {json.dumps({k: round(v, 4) for k, v in sorted(acc.items())})}")
    q = sum(times["new"]) / sum(times["old"])
    print(f"quotient new/old {q:.3f} → Zen 1 ≈ {ZEN1_OLD_DEMO_S:.0f} s × {q:.3f} = {ZEN1_OLD_DEMO_S * q:.0f} s")


if __name__ == "__main__":
    main()
