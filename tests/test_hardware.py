"""Hardware identity, the bf16 probe, `auto` dtypes, and the bounded, cached peak measurement."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from harness.cell.run import resolve_dtypes
from harness.environment import describe
from harness.measure import hardware
from tests.conftest import cells, measurement_counts, run_cli, tiny_suite

CPU = torch.device("cpu")


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    """An empty machine cache for this test only (the session's stays untouched)."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("FTBENCH_CACHE_DIR", str(cache))
    hardware.dtype_speed.cache_clear()
    yield cache
    hardware.dtype_speed.cache_clear()


def fake_speed(monkeypatch, bf16_speedup: float) -> None:
    """Make the probe's matmuls report bf16 at ``bf16_speedup`` × fp32 (e.g. 1/70: emulated; 4: native)."""

    def seconds(n, dtype, device, repeats):
        return 1e-3 / (bf16_speedup if dtype in (torch.bfloat16, torch.float16) else 1.0)

    monkeypatch.setattr(hardware, "matmul_seconds", seconds)


def seed_speed(cache: Path, bf16_speedup: float) -> None:
    """Write a probe result into a machine cache, as a run process on this machine will read it."""
    cache.mkdir(parents=True, exist_ok=True)
    ident = hardware.static_identity(CPU)
    entry = {"n": 256, "bfloat16": {"speedup_vs_float32": bf16_speedup}, "float16": {"speedup_vs_float32": 0.03}}
    path = cache / f"machine-{ident['machine_key']}.json"
    path.write_text(json.dumps({"identity": ident, "dtype_speed": entry}))


def test_auto_is_fp32_where_the_probe_finds_bf16_emulated(fresh_cache, monkeypatch):
    fake_speed(monkeypatch, 1 / 70)
    value, why = hardware.resolve_dtype("auto", CPU)
    assert value == "float32"
    assert why == f"fp32: bf16 emulated ({torch.backends.cpu.get_cpu_capability()}), 70× slower"
    assert hardware.identity(CPU)["native_bf16"] is False
    # explicit bf16 still runs, with the reason it is slow
    isa = torch.backends.cpu.get_cpu_capability()
    assert hardware.resolve_dtype("bfloat16", CPU) == (
        "bfloat16",
        f"set in the suite (bf16 emulated on this CPU ({isa}): 70× slower than fp32)",
    )


def test_auto_is_bf16_where_the_probe_finds_it_native_and_faster(fresh_cache, monkeypatch):
    fake_speed(monkeypatch, 4.0)
    assert hardware.resolve_dtype("auto", CPU) == ("bfloat16", "bf16: measured 4.0× fp32 on this CPU")
    assert hardware.identity(CPU)["native_bf16"] is True
    assert hardware.slow_note("bfloat16", CPU) is None


def test_auto_is_fp32_where_bf16_is_native_but_not_faster(fresh_cache, monkeypatch):
    fake_speed(monkeypatch, 0.9)
    value, why = hardware.resolve_dtype("auto", CPU)
    assert value == "float32" and "not faster" in why


def test_auto_on_a_gpu_without_bf16_is_fp32_and_names_fp16_with_loss_scaling(monkeypatch):
    no_bf16 = {"bfloat16": {"speedup_vs_float32": 0.0}, "float16": {"speedup_vs_float32": 8.0}}  # a T4, a V100
    monkeypatch.setattr(hardware, "dtype_speed", lambda device_type="": no_bf16)
    value, why = hardware.resolve_dtype("auto", torch.device("cuda"))
    assert value == "float32" and why == "fp32: no bf16 on this GPU (dtype float16: fp16 autocast with loss scaling)"
    assert hardware.resolve_dtype("float16", torch.device("cuda")) == ("float16", "set in the suite")
    assert hardware.slow_note("bfloat16", torch.device("cuda")) == "bf16 not supported on this GPU"  # not "emulated"


def test_a_methods_auto_dtype_follows_a_half_precision_training_dtype_it_accepts(fresh_cache, monkeypatch):
    """On a GPU without bf16 `auto` alone is fp32: QLoRA's dequantized matmuls in fp32 beside LoRA's fp16 ones
    would not compare; on a bf16 machine, `auto` alone is bf16 inside fp16 autocast: two roundings in one run."""
    fake_speed(monkeypatch, 1 / 50)  # bf16 emulated: `auto` alone would be fp32
    for train in ("float16", "bfloat16"):
        for method in ("qlora", "qalora"):
            auto = [{"method": method, "config": {"compute_dtype": "auto"}}]
            cfg = cells(train={"steps": 2, "dtype": train}, methods=auto)[0]
            resolved_cfg, dtypes = resolve_dtypes(cfg, CPU)
            assert resolved_cfg.method_config["compute_dtype"] == train, method
            assert (
                dtypes["method.compute_dtype"]["why"]
                == f"{hardware.SHORT[train]}: follows train.dtype, a half-precision run"
            )
    cfg = cells(
        train={"steps": 2, "dtype": "float32"}, methods=[{"method": "qlora", "config": {"compute_dtype": "auto"}}]
    )[0]
    assert resolve_dtypes(cfg, CPU)[0].method_config["compute_dtype"] == "float32"  # fp32 training: the machine's
    explicit = cells(train={"dtype": "float16"}, methods=[{"method": "qlora", "config": {"compute_dtype": "float32"}}])
    assert resolve_dtypes(explicit[0], CPU)[0].method_config["compute_dtype"] == "float32"  # said: kept


def test_a_run_resolves_train_and_method_dtypes_and_says_why(fresh_cache, monkeypatch):
    fake_speed(monkeypatch, 1 / 50)
    cfg = cells(train={"steps": 2, "dtype": "auto"}, methods=[{"method": "qlora", "config": {"compute_dtype": "auto"}}])
    resolved_cfg, dtypes = resolve_dtypes(cfg[0], CPU)
    assert resolved_cfg.train.dtype == "float32" and resolved_cfg.method_config["compute_dtype"] == "float32"
    assert dtypes["train.dtype"]["choice"] == "auto" and "emulated" in dtypes["train.dtype"]["why"]
    assert dtypes["method.compute_dtype"] == {**dtypes["train.dtype"], "choice": "auto"}
    assert cfg[0].train.dtype == "auto"  # the config as written is what the record's `config` keeps
    fake_speed(monkeypatch, 3.0)
    hardware.dtype_speed.cache_clear()
    (fresh_cache / f"machine-{hardware.static_identity(CPU)['machine_key']}.json").unlink()
    resolved_cfg, dtypes = resolve_dtypes(cfg[0], CPU)
    assert resolved_cfg.train.dtype == "bfloat16" and resolved_cfg.method_config["compute_dtype"] == "bfloat16"


def test_the_real_probe_is_cached(fresh_cache):
    speed = hardware.dtype_speed("cpu")
    assert speed["bfloat16"]["speedup_vs_float32"] > 0
    hardware.dtype_speed.cache_clear()
    assert hardware.dtype_speed("cpu") == speed  # from the cache file: not measured again
    assert measurement_counts(fresh_cache) == {"dtype_speed:cpu": 1}


class FakeClock:
    """A clock that only moves when a (fake) matmul runs: the budget logic is tested, not this machine's speed."""

    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now

    def time(self) -> float:
        return 1e9 + self.now


@pytest.mark.parametrize(("flops", "n_expected"), [(2e11, 2048), (3e8, 256)])  # a fast core; emulated bf16
def test_peak_measurement_keeps_to_its_budget(fresh_cache, monkeypatch, flops, n_expected):
    clock, sizes = FakeClock(), []

    def fake_matmuls(n, dtype, device, repeats):
        sizes.append((n, repeats))
        clock.now += repeats * 2 * n**3 / flops
        return 2 * n**3 / flops

    monkeypatch.setattr(hardware, "time", clock)
    monkeypatch.setattr(hardware, "matmul_seconds", fake_matmuls)
    peak = hardware.peak_matmul("float32", CPU, budget_s=1.0, keep_loaded=True)
    one_matmul = 2 * n_expected**3 / flops
    # budget plus one matmul at most: where matmuls are slow the size adapts down instead of taking minutes
    assert clock.now <= 1.0 + one_matmul and peak["n"] == n_expected == sizes[-1][0]
    assert peak["peak_matmul_flops"] == pytest.approx(flops) and peak["seconds"] == pytest.approx(clock.now, abs=1e-3)
    assert hardware.peak_matmul("float32", CPU)["peak_matmul_flops"] == peak["peak_matmul_flops"]
    assert measurement_counts(fresh_cache) == {"peak_matmul:cpu:float32": 1}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_real_peak_measurement_is_cached(fresh_cache, dtype):
    peak = hardware.peak_matmul(dtype, CPU, budget_s=0.5, keep_loaded=True)
    assert peak["peak_matmul_flops"] > 1e8 and 256 <= peak["n"] <= 2048 and "loaded" in peak["load"]
    assert hardware.peak_matmul(dtype, CPU)["peak_matmul_flops"] == peak["peak_matmul_flops"]
    assert measurement_counts(fresh_cache) == {f"peak_matmul:cpu:{dtype}": 1}


def test_a_peak_measured_under_load_is_flagged_and_not_cached(fresh_cache, monkeypatch):
    monkeypatch.delenv("FTBENCH_KEEP_LOADED_PEAK")
    monkeypatch.setattr(hardware, "load_check", lambda: {"loadavg_1m": 5.0, "busy_cores": 1.7, "loaded": True})
    monkeypatch.setattr(hardware, "matmul_seconds", lambda n, dtype, device, repeats: 1e-3)
    assert hardware.peak_matmul("float32", CPU)["load"]["loaded"] is True
    hardware.peak_matmul("float32", CPU)
    assert measurement_counts(fresh_cache)["peak_matmul:cpu:float32"] == 2  # measured again: not trusted


def test_suite_runs_measure_each_peak_once_per_machine(fresh_cache, tmp_path, write_suite):
    """Two suites, each cell in its own process: one probe and one peak per dtype, in all."""
    suite = tiny_suite(methods=[{"method": "lora", "config": {"r": 4}}], train={**tiny_suite()["train"], "steps": 2})
    path = write_suite(suite)
    for results in ("a", "b"):
        out = run_cli("run", str(path), "--results", str(tmp_path / results))
        assert out.returncode == 0, out.stderr[-2000:]
    assert measurement_counts(fresh_cache) == {"dtype_speed:cpu": 1, "peak_matmul:cpu:float32": 1}
    rec = json.loads(next((tmp_path / "a" / "records").glob("*.json")).read_text())
    assert rec["peak_matmul_info"]["source"] == "suite (machine.json)"
    assert rec["peak_matmul_info"]["machine_key"] == hardware.static_identity(CPU)["machine_key"]


def test_explicit_bf16_on_an_emulating_cpu_warns_once_and_says_so_while_training(fresh_cache, tmp_path, write_suite):
    """The fallback path forced on any machine: the probe's cached verdict says bf16 is emulated."""
    seed_speed(fresh_cache, 1 / 80)
    train = {**tiny_suite()["train"], "steps": 2, "dtype": "bfloat16"}
    methods = [{"method": "lora", "config": {"r": 4}}, {"method": "full"}]
    out = run_cli("run", str(write_suite(tiny_suite(train=train, methods=methods))), "--results", str(tmp_path / "r"))
    assert out.returncode == 0, out.stderr[-2000:]
    warnings = [line for line in out.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "bf16 emulated" in warnings[0] and "80× slower" in warnings[0]
    assert "full/default train.dtype=bfloat16" in warnings[0] and "lora/default train.dtype=bfloat16" in warnings[0]
    assert "bf16 emulated (80× slower than fp32)" in out.stderr.splitlines()[0]  # hardware line first
    log = next((tmp_path / "r" / "logs").glob("*lora*.log")).read_text()
    step_lines = [line for line in log.splitlines() if line.startswith("[ftbench] step ")]
    assert step_lines and all("slow: bf16 emulated on this CPU" in line for line in step_lines)
    rec = json.loads(next((tmp_path / "r" / "records").glob("*lora*.json")).read_text())
    assert rec["resolved_dtypes"]["train.dtype"]["value"] == "bfloat16"
    assert rec["environment"]["native_bf16"] is False and rec["environment"]["bf16_speedup_vs_fp32"] == 0.0125


def test_auto_resolves_to_bf16_in_a_run_where_the_probe_says_native(fresh_cache, tmp_path, write_suite):
    seed_speed(fresh_cache, 4.0)
    train = {**tiny_suite()["train"], "steps": 2, "dtype": "auto"}
    out = run_cli("run", str(write_suite(tiny_suite(train=train))), "--results", str(tmp_path / "r"))
    assert out.returncode == 0, out.stderr[-2000:]
    assert "warning:" not in out.stderr
    rec = json.loads(next((tmp_path / "r" / "records").glob("*.json")).read_text())
    assert rec["resolved_dtypes"]["train.dtype"] == {
        "choice": "auto",
        "value": "bfloat16",
        "why": "bf16: measured 4.0× fp32 on this CPU",
    }
    assert rec["config"]["train"]["dtype"] == "auto" and rec["mfu_dtype"] == "bfloat16"


def test_every_record_carries_the_hardware_identity(tmp_path):
    from harness.cell.run import run_cell
    from harness.driver.executor import failure_record

    ok = run_cell(cells(train={**tiny_suite()["train"], "steps": 2})[0].model_copy(update={"export": False}), tmp_path)
    failed = failure_record(cells()[0], "timeout", "x", "now", 1.0)
    for rec in (ok, failed):
        env = rec.environment
        assert env["cpu_model"] and env["cpu_isa"] == torch.backends.cpu.get_cpu_capability()
        assert isinstance(env["native_bf16"], bool) and env["torch_threads"] == torch.get_num_threads()
        assert env["machine_key"] == hardware.static_identity()["machine_key"]


def test_compare_says_when_records_come_from_different_cpus(tmp_path, capsys):
    from harness.cell.run import run_cell
    from harness.driver.cli import main
    from harness.records import write_record

    rec = run_cell(cells(train={**tiny_suite()["train"], "steps": 2})[0].model_copy(update={"export": False}), tmp_path)
    capsys.readouterr()  # the run's own progress lines
    other = {
        **rec.environment,
        "cpu_model": "Intel(R) Xeon(R) Platinum 8480+",
        "cpu_family_model": "family 6 model 143",
        "cpu_isa": "AVX512",
        "native_bf16": True,
        "isa_caps": None,  # this run's own (an AVX2 cap set to test as an AVX2 CPU) is not the Xeon's
    }
    write_record(tmp_path / "new", rec.model_copy(update={"environment": other}))
    assert main(["compare", str(tmp_path), str(tmp_path / "new")]) == 0
    first = next(line for line in capsys.readouterr().out.splitlines() if "different hardware" in line)
    assert first.startswith("- warning: records come from different hardware")
    xeon = "Intel(R) Xeon(R) Platinum 8480+ family 6 model 143 · AVX512 · native bf16"
    assert rec.environment["cpu_model"] in first and xeon in first
    assert main(["compare", str(tmp_path), str(tmp_path)]) == 0
    assert "different hardware" not in capsys.readouterr().out


def test_the_cpu_is_named_with_its_family_and_model():
    """ "AMD EPYC" names Zen 1 and Zen 4 alike (2.5-4× apart): the identity, the run line and every record say the
    family and model /proc/cpuinfo gives, and they are part of the machine cache's key."""
    from pathlib import Path

    info = Path("/proc/cpuinfo")
    if not info.exists():
        pytest.skip("no /proc/cpuinfo")
    fields = dict(line.split(":", 1) for line in info.read_text().splitlines()[:30] if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    ident = hardware.static_identity(CPU)
    assert ident["cpu_family_model"] == f"family {fields['cpu family']} model {fields['model']}"
    line = describe(hardware.identity(CPU))
    assert line.startswith(f"{ident['cpu_model']} family {fields['cpu family']} model {fields['model']} · ")
    import hashlib

    fields = {k: v for k, v in ident.items() if k != "machine_key"}  # the key is a digest of every field
    assert hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12] == ident["machine_key"]


def test_an_isa_cap_or_tf32_set_from_outside_is_another_machine_for_speed_and_is_named(monkeypatch):
    """ONEDNN_MAX_CPU_ISA=AVX2 alone (ATEN's capability unchanged) kept the machine key, so the cached bf16 probe
    of the uncapped CPU was read for a capped one; TF32 in fp32 matmuls changes the fp32 peak alike."""
    from reports.stats import hardware_of
    from tests.test_stats import run

    for cap in ("ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS"):  # a plain environment first
        monkeypatch.delenv(cap, raising=False)
    plain = hardware.static_identity(CPU)
    assert "isa_caps" not in plain and "float32_matmul_precision" not in plain  # a plain machine keeps its key
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    capped = hardware.static_identity(CPU)
    assert capped["isa_caps"] == {"ONEDNN_MAX_CPU_ISA": "AVX2"} and capped["machine_key"] != plain["machine_key"]
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    torch.set_float32_matmul_precision("high")
    try:
        tf32 = hardware.static_identity(CPU)
    finally:
        torch.set_float32_matmul_precision("highest")
    assert tf32["float32_matmul_precision"] == "high" and tf32["machine_key"] != plain["machine_key"]
    env = {**capped, "native_bf16": False, "bf16_speedup_vs_fp32": 0.02}
    assert "· ONEDNN_MAX_CPU_ISA=AVX2 ·" in describe(env)
    assert "ONEDNN_MAX_CPU_ISA=AVX2" in hardware_of(run("full", "01").model_copy(update={"environment": env}))
