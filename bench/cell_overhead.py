"""A cell's fixed cost: the seconds a run spends outside its training steps, on a model too small to matter.

Runs ``ftbench run`` (in this process, so the cells fork from one warm zygote as in any run) on tiny-bert and
Rotten Tomatoes — full fine-tuning and LoRA, ``--seeds`` seeds each, 4 steps — after one warm-up run, and
prints each stage's median and range over the cells from their records' ``stage_seconds``. On the demo's
MiniLM cells this fixed cost is about a second of each cell; in `make test`, with a few hundred small cells,
it is most of their time. Last, the run's own time outside its cells, per cell (the zygote, the checks, starting
each cell and hearing that it ended, the report).

    python bench/cell_overhead.py [--seeds 4]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import yaml


def suite(seeds: int) -> dict:
    """The tiny suite: every stage a cell has, none of them doing much."""
    return {
        "name": "cell_overhead",
        "models": ["tiny-bert"],
        "tasks": [{"name": "rotten_tomatoes", "train_examples": 128, "eval_examples": 64}],
        "train": {"steps": 4, "batch_size": 8, "lr": 1e-3, "max_seq_len": 32, "timing_warmup_steps": 1},
        "methods": [{"method": "full"}, {"method": "lora", "config": {"r": 4}}],
        "seeds": list(range(seeds)),
        "deploy": {"enabled": False},
    }


def main() -> None:
    """Warm up, run the suite, print per-stage medians and ranges."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=4)
    args = ap.parse_args()
    from harness.driver.cli import main as ftbench

    with tempfile.TemporaryDirectory(prefix="ftbench-cell-overhead-") as d:
        tmp = Path(d)
        path = tmp / "suite.yaml"
        path.write_text(yaml.safe_dump(suite(args.seeds)))
        for name in ("warmup", "measured"):  # the first run also starts the zygote and fills the caches
            t0 = time.perf_counter()
            rc = ftbench(["run", str(path), "--results", str(tmp / name)])
            run_s = time.perf_counter() - t0
            assert rc in (0, None), f"ftbench run exited {rc}"
        records = [json.loads(p.read_text()) for p in sorted((tmp / "measured" / "records").glob("*.json"))]
    hw = records[0]["environment"]
    print(f"\n{len(records)} cells · {hw.get('cpu_model')} {hw.get('cpu_family_model', '')} · seconds per cell")
    stages = sorted({k for r in records for k in r["stage_seconds"]}, key=list(records[0]["stage_seconds"]).index)
    for stage in stages + ["outside training", "whole cell"]:
        if stage == "outside training":
            xs = [r["wall_time_s"] - r["stage_seconds"].get("train", 0.0) for r in records]
        elif stage == "whole cell":
            xs = [r["wall_time_s"] for r in records]
        else:
            xs = [r["stage_seconds"].get(stage, 0.0) for r in records]
        print(f"  {stage:<17} median {statistics.median(xs):6.3f}   range {min(xs):.3f}–{max(xs):.3f}")
    outside = run_s - sum(r["wall_time_s"] for r in records)  # zygote start, checks, forks, waits, the report
    print(f"  outside the cells {outside / len(records):6.3f}   (the run's {run_s:.1f} s less its cells', per cell)")


if __name__ == "__main__":
    main()
