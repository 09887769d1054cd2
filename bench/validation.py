"""How long a user waits for a suite's verdict (never in `make test`: these are wall-clock figures).

1. ``ftbench run`` on a suite with an unknown method, as a user runs it (a fresh process): the cheap checks
   report it before torch is imported. Goal: ≤ 2 s on a 2-core Zen-1 EPYC.
2. Full validation (both phases) of 40 PEFT variants against SmolLM2-135M's skeleton, in a fresh process
   (the skeleton comes from SmolLM2's config: the GGUF conversion is not needed). Goal: ≤ 20 s there.
3. ``ftbench run`` on a suite whose target module does not exist (a skeleton check: it runs in a fork of the
   cells' zygote, harness/driver/torchside.py): wall and CPU seconds, the driver and its zygote together.

    python bench/validation.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.conftest import tiny_suite  # noqa: E402

PEFT_TYPES = ["LORA", "LOHA", "LOKR", "VERA", "IA3", "FOURIERFT", "LILY", "BOFT"]


def forty_variants() -> list[dict]:
    out = []
    for i, t in enumerate(PEFT_TYPES * 5):
        cfg = {"peft_type": t, "target_modules": ["q_proj", "v_proj"]}
        cfg |= {"feedforward_modules": []} if t == "IA3" else {}
        cfg |= {"boft_block_size": 4} if t == "BOFT" else {}
        out.append({"method": "peft", "variant": f"v{i}", "config": cfg})
    return out


def timed(cmd: list[str]) -> tuple[float, subprocess.CompletedProcess]:
    s, _, out = timed_cpu(cmd)
    return s, out


def timed_cpu(cmd: list[str]) -> tuple[float, float, subprocess.CompletedProcess]:
    """Wall seconds, CPU seconds (user + system, the command and every process it waited for) and the result."""
    import resource

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), out


def cpu() -> str:
    info = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    field = {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in info.splitlines())}
    return f"{field.get('Model name')}, family {field.get('CPU family')} model {field.get('Model')}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    print(f"CPU: {cpu()}")
    with tempfile.TemporaryDirectory() as d:
        bad = Path(d) / "bad.yaml"
        bad.write_text(yaml.safe_dump(tiny_suite(methods=[{"method": "nosuch"}])))
        times = []
        for _ in range(args.repeats):
            s, out = timed([sys.executable, "-m", "harness", "run", str(bad), "--results", f"{d}/r"])
            assert out.returncode == 2 and "unknown method" in out.stderr, out.stderr
            times.append(s)
        print(f"unknown method: one line, exit 2, in {statistics.median(times):.2f} s (median of {len(times)})")
        peft = Path(d) / "peft.yaml"
        peft.write_text(yaml.safe_dump(tiny_suite(models=["smollm2-135m"], methods=forty_variants())))
        code = f"from harness.driver.suite import load_suite; load_suite({str(peft)!r})"
        s, out = timed([sys.executable, "-c", code])
        assert out.returncode == 0, out.stderr[-2000:]
        print(f"40 PEFT variants on SmolLM2's skeleton, both phases, fresh process: {s:.1f} s")
        module = Path(d) / "module.yaml"
        module.write_text(yaml.safe_dump(tiny_suite(methods=[{"method": "lora", "config": {"target_modules": ["x"]}}])))
        runs = []
        for _ in range(args.repeats):
            wall, cpu_s, out = timed_cpu([sys.executable, "-m", "harness", "run", str(module), "--results", f"{d}/r"])
            assert out.returncode == 2 and "no module named 'x'" in out.stderr, out.stderr
            runs.append((wall, cpu_s))
        wall, cpu_s = (statistics.median(x) for x in zip(*runs, strict=True))
        print(f"unknown target module (a skeleton check): one line, exit 2, in {wall:.2f} s, {cpu_s:.2f} s of CPU")


if __name__ == "__main__":
    main()
