"""Measurements: peak memory (named for what it is), step-time statistics, and parameter counts.

Memory on CPU has no allocator statistics, so ftbench measures the *peak of live tensor bytes* from the
tensors themselves, by category (see :mod:`harness.measure.memory`); the process peak RSS is recorded beside it.
On CUDA the allocator's own ``max_memory_allocated`` / ``max_memory_reserved`` are recorded as well.
"""

from __future__ import annotations

import resource
import statistics
import sys

import torch


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (Linux reports KiB, macOS bytes)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def step_time_stats(times_s: list[float]) -> dict[str, float | int | None]:
    """Count, mean, median, p90 and stdev of measured step times (warm-up steps already excluded)."""
    if not times_s:
        return {"count": 0, "mean_s": None, "median_s": None, "p90_s": None, "stdev_s": None, "min_s": None}
    xs = sorted(times_s)
    p90 = xs[min(len(xs) - 1, max(0, int(round(0.9 * (len(xs) - 1)))))]
    return {
        "count": len(xs),
        "mean_s": statistics.fmean(xs),
        "median_s": statistics.median(xs),
        "p90_s": p90,
        "stdev_s": statistics.stdev(xs) if len(xs) > 1 else 0.0,
        "min_s": xs[0],
    }


def parameter_counts(model: torch.nn.Module) -> dict[str, int | float]:
    """Total and trainable parameters, and the bytes the weights occupy as stored.

    Quantized weights count by their logical number of values so totals compare across methods: bitsandbytes
    4-bit parameters by ``quant_state.shape``; modules that keep integer weights in buffers (QA-LoRA's
    QuantLinear) by their ``quantized_numel()``, their buffers (packed integers, scales, zeros, bias) as storage."""
    total = trainable = weight_bytes = 0
    seen: set[int] = set()
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        qs = getattr(p, "quant_state", None)
        n = int(torch.Size(qs.shape).numel()) if qs is not None else p.numel()
        total += n
        trainable += n if p.requires_grad else 0
        weight_bytes += p.untyped_storage().nbytes() + (_quant_state_bytes(qs) if qs is not None else 0)
    for mod in model.modules():
        if callable(getattr(mod, "quantized_numel", None)):
            total += mod.quantized_numel()
            weight_bytes += sum(b.untyped_storage().nbytes() for b in mod.buffers(recurse=False))
    return {
        "total_params": total,
        "trainable_params": trainable,
        "trainable_pct": 100.0 * trainable / max(total, 1),
        "weight_bytes": weight_bytes,
    }


def _quant_state_bytes(qs) -> int:
    """Quantization constants that live beside packed weights (absmax, nested absmax, code tables)."""
    n = 0
    for name in ("absmax", "code", "offset"):
        t = getattr(qs, name, None)
        n += t.numel() * t.element_size() if torch.is_tensor(t) else 0
    state2 = getattr(qs, "state2", None)
    return n + (_quant_state_bytes(state2) if state2 is not None else 0)


def cuda_memory_reset(device: torch.device) -> None:
    """Reset the CUDA allocator's peak counters on ``device`` (nothing on a CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def cuda_memory_peaks(device: torch.device) -> dict[str, int]:
    """The CUDA allocator's peaks since the last reset: allocated and reserved bytes."""
    if device.type != "cuda":
        return {}
    torch.cuda.synchronize(device)
    return {
        "cuda_max_allocated_bytes": torch.cuda.max_memory_allocated(device),
        "cuda_max_reserved_bytes": torch.cuda.max_memory_reserved(device),
    }


def sync(device: torch.device) -> None:
    """Step timing must wait for queued GPU work; on CPU work is synchronous."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def memory_methods(device_type: str) -> dict[str, str]:
    """How each memory figure of a record was measured (the record says it beside the numbers)."""
    out = {
        "peak_live_tensor_bytes": "live tensor storages (TorchDispatchMode + weakrefs) over the tracked steps: the "
        "timing warm-up, step 1 (the first beside the optimizer state) where a later step is left to time, and each "
        "step with a larger batch than every tracked one (memory_tracked_steps; never timed)",
        "memory_at_peak_bytes": "same, by category; categories settled at step end (harness/measure/memory.py)",
        "peak_rss_bytes": "getrusage(RUSAGE_SELF).ru_maxrss of the run process (whole run, incl. loading/eval)",
        "optimizer_state_bytes": "sum of optimizer state tensor storages after training",
    }
    if device_type == "cuda":
        out["cuda_max_allocated_bytes"] = "torch.cuda.max_memory_allocated over training"
        out["cuda_max_reserved_bytes"] = "torch.cuda.max_memory_reserved over training"
        out["nvml_process_bytes"] = "NVML compute-process usedGpuMemory for this pid"
    return out


class Contention:
    """How much CPU other processes took while we trained: (machine busy CPU-seconds − ours) / wall seconds, in
    cores. Step times and MFU measured while others take more than half a core are flagged in the record (on 2
    cores, one busy neighbour moved full fine-tuning's MFU from 60.6% to 36.7%): over the whole training, or in
    windows of steps (``step`` between steps, windows of at least ``WINDOW_S``: the kernel counts CPU time in 10
    ms ticks) that add up to more than a tenth of it. A burst in 3 of 20 steps (7.7, 5.5 and 10 s against a
    median of 1.8) moved prompt tuning's MFU on SmolLM2 from 57% to 34%, while the whole run's average, 0.37
    cores, stayed under the threshold."""

    LOADED_CORES, LOADED_SHARE, WINDOW_S = 0.5, 0.1, 0.5

    def __init__(self) -> None:
        import os
        import time

        import psutil

        self._t = time.perf_counter
        self._own = psutil.Process(os.getpid())
        self._psutil = psutil
        self.before = self._window = self._sample()
        self._loaded_s = self._worst = 0.0

    def _sample(self) -> dict:
        import os

        cpu = self._psutil.cpu_times()
        own = self._own.cpu_times()
        idle = cpu.idle + getattr(cpu, "iowait", 0.0)
        return {
            "wall": self._t(),
            "busy": sum(cpu) - idle,
            "own": own.user + own.system,
            "loadavg_1m": os.getloadavg()[0],
        }

    @staticmethod
    def _others(a: dict, b: dict) -> tuple[float, float]:
        """(other processes' cores, wall seconds) between two samples."""
        wall = max(b["wall"] - a["wall"], 1e-9)
        return max(0.0, (b["busy"] - a["busy"]) - (b["own"] - a["own"])) / wall, wall

    def step(self) -> None:
        """Between two steps (outside their timing): closes the current window once it is ``WINDOW_S`` long."""
        now = self._sample()
        if now["wall"] - self._window["wall"] < self.WINDOW_S:
            return
        others, wall = self._others(self._window, now)
        self._loaded_s += wall if others > self.LOADED_CORES else 0.0
        self._worst, self._window = max(self._worst, others), now

    def result(self) -> dict:
        import os

        after = self._sample()
        others, wall = self._others(self.before, after)
        share = self._loaded_s / wall
        # `ftbench run --jobs N` runs N cells side by side: each one's timings are flagged whatever the sample says
        concurrent = int(os.environ.get("FTBENCH_JOBS", "1"))
        return {
            "other_processes_cores": round(others, 3),
            "other_processes_cores_worst_window": round(self._worst, 3),
            "loaded_share": round(share, 3),
            "loadavg_1m_before": self.before["loadavg_1m"],
            "loadavg_1m_after": after["loadavg_1m"],
            "seconds": round(wall, 3),
            "concurrent_cells": concurrent,
            "loaded": others > self.LOADED_CORES or share > self.LOADED_SHARE or concurrent > 1,
        }

    @staticmethod
    def note(c: dict) -> str | None:
        """What the cell's progress says of a :meth:`result`: cells side by side, or a run under load."""
        if c["concurrent_cells"] > 1:
            return (
                f"note: {c['concurrent_cells']} cells ran side by side (--jobs): this run's step times and MFU are "
                "flagged as measured under load"
            )
        if c["loaded"]:
            return (
                f"warning: other processes took {c['other_processes_cores']} cores while this run trained (up to "
                f"{c['other_processes_cores_worst_window']} in {c['loaded_share']:.0%} of it): its step times and "
                "MFU are flagged as measured under load"
            )
        return None
