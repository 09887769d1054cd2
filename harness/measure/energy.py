"""Energy of a run's training, from a hardware counter, or "not measured" — never an estimate shown as one.

  cuda  NVML's total energy counter of the run's GPU (millijoules since the driver loaded; Volta and later);
        the GPU's whole draw, other processes on it included.
  cpu   RAPL package counters under /sys/class/powercap (microjoules, wrapping at max_energy_range_uj), where
        the kernel exposes them readable; the whole package's draw, other processes included.
Elsewhere (no counter, or not readable without root) the record says why it was not measured.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

POWERCAP = Path("/sys/class/powercap")


def _nvml_reader(device) -> tuple[str, Callable[[], float]]:
    import pynvml
    import torch

    pynvml.nvmlInit()
    index = device.index if device.index is not None else torch.cuda.current_device()
    try:  # by UUID: NVML's indices ignore CUDA_VISIBLE_DEVICES, torch's follow it
        uuid = str(torch.cuda.get_device_properties(index).uuid)
        handle = pynvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith("GPU-") else f"GPU-{uuid}")
    except Exception:  # noqa: BLE001 - an older driver or torch: the index is right without CUDA_VISIBLE_DEVICES
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
    pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)  # raises where the GPU has no counter
    return "NVML total energy (whole GPU)", lambda: pynvml.nvmlDeviceGetTotalEnergyConsumption(handle) / 1e3


def _rapl_reader() -> tuple[str, Callable[[], float]]:
    zones = [z for z in sorted(POWERCAP.glob("*rapl:[0-9]*")) if ":" in z.name and z.name.count(":") == 1]
    if not zones:
        raise OSError(f"no RAPL package counter under {POWERCAP}")
    files = [(z / "energy_uj", int((z / "max_energy_range_uj").read_text())) for z in zones]
    for f, _ in files:
        f.read_text()  # raises PermissionError where only root may read it
    last: dict[Path, int] = {}
    total = [0.0]

    def read() -> float:  # joules, monotonic across the counters' wrap-around
        for f, wrap in files:
            now = int(f.read_text())
            if f in last:
                total[0] += ((now - last[f]) % wrap) / 1e6
            last[f] = now
        return total[0]

    return f"RAPL package counters ({len(zones)} package(s), whole CPU)", read


def _reader(device) -> tuple[str, Callable[[], float]]:
    return _nvml_reader(device) if device.type == "cuda" else _rapl_reader()


def energy_source(device) -> dict[str, Any]:
    """Which counter a run on ``device`` would read, or why none."""
    try:
        source, read = _reader(device)
        read()
        return {"source": source, "readable": True}
    except Exception as err:  # noqa: BLE001 - any failure means: not measured, and why
        return {"source": None, "readable": False, "why": f"{type(err).__name__}: {err}"}


class EnergyMeter:
    """Joules between :meth:`start` and :meth:`stop`, per 1k training tokens too."""

    def __init__(self, device) -> None:
        try:
            self.source, self._read = _reader(device)
            self.why = ""
        except Exception as err:  # noqa: BLE001
            self.source, self._read, self.why = None, None, f"{type(err).__name__}: {err}"
        self._t0: float | None = None

    def start(self) -> None:
        if self._read is not None:
            self._t0 = self._read()

    def stop(self, train_tokens: int) -> dict[str, Any]:
        if self._read is None or self._t0 is None:
            return {"not_measured": self.why or "no counter was read"}
        joules = self._read() - self._t0
        per_1k = joules / train_tokens * 1000 if train_tokens else None
        return {"joules": joules, "per_1k_train_tokens_j": per_1k, "source": self.source}
