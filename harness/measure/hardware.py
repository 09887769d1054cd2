"""What this machine is, and what it runs fast: hardware identity, the bf16 probe, `auto` dtypes, the peak.

Speed depends on the CPU more than on anything else ftbench controls. torch's bf16 matmul runs natively on
CPUs with AMX or AVX512-BF16 (about 4× float32) and is *emulated* on AVX2-only CPUs (100–240× slower than
float32). Flags alone do not say what torch's kernels do with them, so ftbench measures: a probe of a few 256²
matmuls (well under a second even where bf16 is emulated) decides whether bf16 (and fp16) are faster than
float32 here, and every ``auto`` dtype resolves from that. The peak matmul rate, MFU's denominator, is
measured within a time budget per dtype (≤ 2 s whatever the machine: the size adapts) and under a load check.

Both are cached per machine — CPU model, ISA level, threads, torch version, GPU — in ``$FTBENCH_CACHE_DIR``
(default ``$XDG_CACHE_HOME/ftbench``, i.e. ``~/.cache/ftbench``). Every measurement appends a line to
``measurements.jsonl`` there, so a test can count them.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import platform
import time
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from harness.cache import cache_dir
from harness.measure.runstats import sync
from harness.schema import AutoDtype

PROBE_N = 256  # where emulated bf16 shows at once (~25 ms a matmul) and native bf16 is already faster
CONFIRM_N = 512  # a plausibly native result is confirmed where fixed costs matter less
FASTER = 1.1  # bf16 must beat float32 by this factor for `auto` to choose it
PEAK_BUDGET_S = 2.0
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SHORT = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
HALF = ("bfloat16", "float16")


def default_device(choice: str | None = None) -> torch.device:
    """``choice`` (a suite's ``device:`` or ``--device``: cpu, cuda, cuda:N), else CUDA where torch sees it."""
    if choice:
        return torch.device(choice)
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _cpuinfo(field: str) -> str | None:
    """The first ``field : value`` line of /proc/cpuinfo (Linux), else None."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == field:
                return value.strip()
    except OSError:
        pass
    return None


def static_identity(device: torch.device | None = None) -> dict[str, Any]:
    """What identifies a machine for speed: the cache key is made of exactly these fields."""
    device = device or default_device()
    family, model = _cpuinfo("cpu family"), _cpuinfo("model")
    ident = {
        "cpu_model": _cpuinfo("model name") or platform.processor() or platform.machine(),
        # "AMD EPYC" names Zen 1 to Zen 5 alike, 2.5× apart in fp32 speed: family and model tell them apart
        "cpu_family_model": f"family {family} model {model}" if model else None,
        "cpu_isa": torch.backends.cpu.get_cpu_capability(),
        "cpu_bf16_flags": sorted(
            set((_cpuinfo("flags") or "").split()) & {"avx512_bf16", "amx_bf16", "amx_tile", "avx512_fp16"}
        ),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "device": device.type,
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
    }
    # What else changes a matmul's speed from the outside: oneDNN's and MKL's ISA caps (ATEN's is cpu_isa), and
    # fp32 matmuls allowed TF32 (or bf16) on a GPU. Kept only when set, so a plain machine keeps its key and cache.
    caps = {k: os.environ[k] for k in ("ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS") if os.environ.get(k)}
    if caps:
        ident["isa_caps"] = caps
    if torch.get_float32_matmul_precision() != "highest":
        ident["float32_matmul_precision"] = torch.get_float32_matmul_precision()
    ident["machine_key"] = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:12]
    return ident


@contextlib.contextmanager
def _machine_cache(device: torch.device):
    """The per-machine cache as a dict, under an exclusive lock (two runs starting at once measure once)."""
    ident = static_identity(device)
    d = cache_dir()
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"machine-{ident['machine_key']}.json"
    with open(d / f".machine-{ident['machine_key']}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            data = json.loads(path.read_text()) if path.exists() else {}
        except ValueError:  # a corrupt cache is re-measured, never trusted
            data = {}
        before = json.dumps(data, sort_keys=True)
        data.setdefault("identity", ident)
        yield data
        if json.dumps(data, sort_keys=True) != before:
            from harness.atomic import atomic_write_text

            atomic_write_text(path, json.dumps(data, indent=1, sort_keys=True))


def _log_measurement(what: str, key: str, seconds: float, machine: str) -> None:
    line = {"what": what, "key": key, "machine": machine, "seconds": round(seconds, 3), "pid": os.getpid()}
    with open(cache_dir() / "measurements.jsonl", "a") as fh:
        fh.write(json.dumps(line) + "\n")


def matmul_seconds(n: int, dtype: torch.dtype, device: torch.device, repeats: int) -> float:
    """Best wall time of ``repeats`` n×n matmuls in ``dtype`` (the first call is one of them)."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def _measure_dtype_speed(device: torch.device) -> dict[str, Any]:
    """Speed of bf16 and fp16 matmuls relative to float32, at a size where emulation shows at once."""
    n = 2048 if device.type == "cuda" else PROBE_N
    out: dict[str, Any] = {"n": n}
    fp32 = matmul_seconds(n, torch.float32, device, 4)
    for name in ("bfloat16", "float16"):
        if device.type == "cuda" and name == "bfloat16" and not torch.cuda.is_bf16_supported():
            out[name] = {"speedup_vs_float32": 0.0, "n": n, "note": "not supported by this GPU"}
            continue
        t = matmul_seconds(n, DTYPES[name], device, 3)
        speedup, size = fp32 / t, n
        if speedup > 0.5 and device.type == "cpu":  # plausibly native: confirm where fixed costs matter less
            size = CONFIRM_N
            speedup = matmul_seconds(size, torch.float32, device, 3) / matmul_seconds(size, DTYPES[name], device, 3)
        out[name] = {"speedup_vs_float32": speedup, "n": size}
    return out


@lru_cache(maxsize=4)
def dtype_speed(device_type: str = "") -> dict[str, Any]:
    """The probe's result for this machine: measured once, then read from the cache."""
    device = torch.device(device_type) if device_type else default_device()
    with _machine_cache(device) as cache:
        if "dtype_speed" not in cache:
            t0 = time.perf_counter()
            cache["dtype_speed"] = _measure_dtype_speed(device)
            _log_measurement("dtype_speed", device.type, time.perf_counter() - t0, cache["identity"]["machine_key"])
        return cache["dtype_speed"]


def is_fast(dtype_name: str, device: torch.device | None = None) -> bool:
    """True where ``dtype_name`` matmuls are at least as fast as float32 (float32 itself always is)."""
    if dtype_name == "float32":
        return True
    return dtype_speed((device or default_device()).type)[dtype_name]["speedup_vs_float32"] >= FASTER


EMULATED = 0.5  # a half-precision dtype under half fp32's speed is emulated, not merely not faster


def is_emulated(dtype_name: str, device: torch.device | None = None) -> bool:
    """Whether this device emulates ``dtype_name`` (bf16 on an AVX2-only CPU: 35–240× slower than fp32)."""
    if dtype_name == "float32":
        return False
    return dtype_speed((device or default_device()).type)[dtype_name]["speedup_vs_float32"] < EMULATED


def slow_note(dtype_name: str, device: torch.device | None = None) -> str | None:
    """Why a half-precision dtype is slow here, or None where it is not (said in warnings and progress)."""
    if dtype_name == "float32" or is_fast(dtype_name, device):
        return None
    device = device or default_device()
    s = dtype_speed(device.type)[dtype_name]["speedup_vs_float32"]
    where = f"this CPU ({static_identity(device)['cpu_isa']})" if device.type == "cpu" else "this GPU"
    if s <= 0:  # the probe's mark for a dtype the device lacks (bf16 on a T4 or V100)
        return f"{SHORT[dtype_name]} not supported on {where}"
    slower = f"{1 / s:.0f}× slower than fp32"
    if s < EMULATED:
        return f"{SHORT[dtype_name]} emulated on {where}: {slower}"
    return f"{SHORT[dtype_name]} not faster here"


def resolve_dtype(choice: str, device: torch.device | None = None) -> tuple[str, str]:
    """(dtype, why). ``auto`` is bf16 where the device runs bf16 matmuls natively and faster, else float32."""
    device = device or default_device()
    if choice != "auto":
        note = slow_note(choice, device)
        return choice, "set in the suite" + (f" ({note})" if note else "")
    s = dtype_speed(device.type)["bfloat16"]["speedup_vs_float32"]
    where = "this GPU" if device.type == "cuda" else "this CPU"
    if s >= FASTER:
        return "bfloat16", f"bf16: measured {s:.1f}× fp32 on {where}"
    if s < 0.5:
        isa = static_identity(device)["cpu_isa"] if device.type == "cpu" else "GPU"
        if s > 0:
            return "float32", f"fp32: bf16 emulated ({isa}), {1 / s:.0f}× slower"
        # A GPU without bf16 (T4, V100) has fast fp16, but fp16 can overflow where fp32 would not: asked for, not auto
        return "float32", "fp32: no bf16 on this GPU (dtype float16: fp16 autocast with loss scaling)"
    return "float32", f"fp32: bf16 not faster on {where} ({s:.2f}× fp32)"


def auto_dtype_fields(config_cls: type) -> list[str]:
    """Fields of a pydantic config class marked with :class:`AutoDtype`."""
    return [name for name, f in config_cls.model_fields.items() if any(isinstance(m, AutoDtype) for m in f.metadata)]


def resolve_config_dtypes(
    config_cls: type,
    values: dict[str, Any],
    device: torch.device | None = None,
    prefix: str = "method.",
    train_dtype: str | None = None,
) -> tuple[dict[str, Any], dict[str, dict[str, str]]]:
    """``values`` with every AutoDtype field resolved, and {field: {choice, value, why}} for the record. Where the
    run trains in a half dtype (``train_dtype``, resolved) that a field accepts, its ``auto`` is that dtype: QLoRA
    dequantizing to fp32 beside LoRA's fp16 base matmuls would compare the two unfairly (a T4 has no bf16, so
    `auto` alone says fp32), and bf16 inside fp16 autocast would mix two roundings in one run."""
    from typing import get_args

    values, resolved = dict(values), {}
    for name in auto_dtype_fields(config_cls):
        choice = values.get(name, config_cls.model_fields[name].default)
        if not isinstance(choice, str) or choice not in (*DTYPES, "auto"):
            continue
        if (
            choice == "auto"
            and train_dtype in HALF
            and train_dtype in get_args(config_cls.model_fields[name].annotation)
        ):
            value, why = train_dtype, f"{SHORT[train_dtype]}: follows train.dtype, a half-precision run"
        else:
            value, why = resolve_dtype(choice, device)
        values[name] = value
        resolved[prefix + name] = {"choice": choice, "value": value, "why": why}
    return values, resolved


def identity(device: torch.device | None = None) -> dict[str, Any]:
    """Hardware identity for records, run output and reports: the static fields plus the probe's verdict."""
    device = device or default_device()
    ident = static_identity(device)
    speed = dtype_speed(device.type)
    ident["native_bf16"] = is_fast("bfloat16", device)
    ident["bf16_speedup_vs_fp32"] = round(speed["bfloat16"]["speedup_vs_float32"], 4)
    return ident


def load_check(interval_s: float = 0.2) -> dict[str, Any]:
    """How busy the machine is *besides us* (we sleep while sampling): a peak measured while other processes
    take more than half a core is flagged and not kept in the machine cache."""
    import psutil

    busy_pct = psutil.cpu_percent(interval=interval_s)  # whole machine, 0–100
    cores = os.cpu_count() or 1
    return {
        "loadavg_1m": os.getloadavg()[0],
        "busy_cores": round(busy_pct / 100 * cores, 2),
        "loaded": busy_pct / 100 * cores > 0.5,
    }


def _measure_peak(dtype: torch.dtype, device: torch.device, budget_s: float) -> dict[str, Any]:
    """Largest square matmul that fits the budget (doubling from 256, up to 2048 on CPU, 8192 on GPU), then the
    best of as many repeats as the remaining budget allows (≤ 10)."""
    t_start, n, max_n = time.perf_counter(), 256, (8192 if device.type == "cuda" else 2048)
    t = matmul_seconds(n, dtype, device, 2)
    while n < max_n and (time.perf_counter() - t_start) + 8 * t * 3 <= budget_s:
        n *= 2
        t = matmul_seconds(n, dtype, device, 2)
    left = budget_s - (time.perf_counter() - t_start)
    repeats = max(1, min(10, int(left / max(t, 1e-9))))
    t = min(t, matmul_seconds(n, dtype, device, repeats))
    return {
        "peak_matmul_flops": 2 * n**3 / t,
        "n": n,
        "repeats": repeats + 2,
        "seconds": round(time.perf_counter() - t_start, 3),
        "method": f"best of {repeats + 2} × {n}² matmul in {dtype_name(dtype)} on {device.type}, {budget_s:g} s budget",
    }


def dtype_name(dtype: torch.dtype) -> str:
    """A torch dtype's name as suites write it (``float32``, ``bfloat16``)."""
    return next(k for k, v in DTYPES.items() if v == dtype)


def torch_dtype(name: str, device: torch.device | None = None) -> torch.dtype:
    """A dtype by name; ``auto`` resolves here (the harness resolves it before a run, so a method used on its
    own still works)."""
    return DTYPES[resolve_dtype(name, device)[0] if name == "auto" else name]


def peak_matmul(
    dtype: str, device: torch.device | None = None, budget_s: float = PEAK_BUDGET_S, keep_loaded: bool = False
) -> dict[str, Any]:
    """This machine's practical peak matmul rate in ``dtype``: cached per machine, measured (bounded, load
    checked) when missing. A figure measured under load is returned flagged and not cached (unless
    ``keep_loaded`` or FTBENCH_KEEP_LOADED_PEAK=1: the test suite measures once per session whatever the load)."""
    device = device or default_device()
    key = f"{device.type}:{dtype}"
    with _machine_cache(device) as cache:
        if key in cache.get("peak", {}):
            return cache["peak"][key]
        load = load_check()
        entry = _measure_peak(DTYPES[dtype], device, budget_s)
        entry.update(load=load, machine_key=cache["identity"]["machine_key"], measured_at=time.time())
        _log_measurement("peak_matmul", key, entry["seconds"], entry["machine_key"])
        if keep_loaded or not load["loaded"] or os.environ.get("FTBENCH_KEEP_LOADED_PEAK") == "1":
            cache.setdefault("peak", {})[key] = entry
        return entry
