"""Stage 1 of gpu/check.sh: what this machine runs, and whether the pieces a GPU run leans on work at all.

Each check runs on its own and records its error rather than stopping the rest: versions and where each
package came from (the image or the bundle), the device, which bitsandbytes binary loaded, an NF4 matmul
forward and backward against the dense product, one paged 8-bit AdamW step (and whether its state really is
paged), whether NVML sees this process, and which energy counter is readable. Writes JSON to stdout (and ``--out``).
Usage: ``python gpu/probe.py [--device cuda|cpu] [--out FILE]``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import traceback
from typing import Any


def _check(out: dict, name: str, fn) -> None:
    try:
        out[name] = fn()
    except Exception as err:  # noqa: BLE001 - every check reports, none stops the probe
        out[name] = {"error": f"{type(err).__name__}: {err}", "where": traceback.format_exc(limit=-2)}


def versions() -> dict[str, Any]:
    out: dict[str, Any] = {"python": sys.version.split()[0]}
    for name in ("torch", "transformers", "peft", "pydantic", "bitsandbytes", "plotly", "pandas", "pynvml"):
        try:
            mod = importlib.import_module(name)
            out[name] = {"version": getattr(mod, "__version__", "?"), "from": os.path.dirname(mod.__file__ or "")}
        except Exception as err:  # noqa: BLE001
            out[name] = {"error": f"{type(err).__name__}: {err}"}
    import torch

    out["torch_cuda"] = torch.version.cuda
    return out


def device_info(device) -> dict[str, Any]:
    import torch

    if device.type != "cuda":
        return {"device": "cpu", "threads": torch.get_num_threads()}
    p = torch.cuda.get_device_properties(device)
    return {"device": p.name, "capability": f"{p.major}.{p.minor}", "memory_gib": round(p.total_memory / 2**30, 1)}


def bnb_binary() -> dict[str, Any]:
    import bitsandbytes.cextension as c

    lib = getattr(getattr(c, "lib", None), "_lib", None)
    return {"backend": getattr(c, "BNB_BACKEND", "?"), "library": getattr(lib, "_name", None)}


def nf4_matmul(device) -> dict[str, Any]:
    """A Linear4bit (NF4, double quantization) forward and backward against the dense product of its own
    dequantized weight: the relative error of y and of dL/dx."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as F
    import torch

    torch.manual_seed(0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    q = bnb.nn.Linear4bit(256, 128, bias=False, compute_dtype=dtype, compress_statistics=True, quant_type="nf4")
    q.weight = bnb.nn.Params4bit(torch.randn(128, 256) * 0.05, requires_grad=False, quant_type="nf4", module=q)
    q = q.to(device)
    x = torch.randn(4, 256, device=device, dtype=dtype, requires_grad=True)
    y = q(x)
    y.float().pow(2).sum().backward()
    w = F.dequantize_4bit(q.weight.data, q.weight.quant_state).to(dtype)
    x2 = x.detach().clone().requires_grad_(True)
    y2 = x2 @ w.t()
    y2.float().pow(2).sum().backward()
    rel = lambda a, b: float((a.float() - b.float()).norm() / b.float().norm())  # noqa: E731
    return {"forward_rel_error": rel(y, y2), "backward_rel_error": rel(x.grad, x2.grad), "ok": rel(y, y2) < 0.02}


def paged_adamw(device) -> dict[str, Any]:
    import bitsandbytes as bnb
    import torch

    from harness.cell.optim import paged_state_in_use

    p = torch.nn.Parameter(torch.randn(4096, 1024, device=device))
    opt = bnb.optim.PagedAdamW8bit([p], lr=1e-3)
    p.grad = torch.randn_like(p)
    before = p.detach().clone()
    opt.step()
    return {"stepped": bool((p.detach() != before).any()), "paged": paged_state_in_use(opt)}


def nvml() -> dict[str, Any]:
    import pynvml

    from harness.measure.memory import nvml_process_bytes

    pynvml.nvmlInit()
    h = pynvml.nvmlDeviceGetHandleByIndex(0)
    pids = [p.pid for p in pynvml.nvmlDeviceGetComputeRunningProcesses(h)]
    energy = None
    try:
        energy = pynvml.nvmlDeviceGetTotalEnergyConsumption(h)  # mJ since the driver loaded
    except pynvml.NVMLError as err:
        energy = f"not available: {err}"
    return {
        "driver": pynvml.nvmlSystemGetDriverVersion(),
        "pids_seen": pids,
        "sees_this_process": os.getpid() in pids,
        "harness_process_bytes": nvml_process_bytes(),
        "total_energy_mj": energy,
    }


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", help="also write the JSON here (stdout mixes in libraries' own lines)")
    args = p.parse_args()
    from harness.libs import quiet_libraries

    quiet_libraries()  # as in every ftbench process: gptqmodel and torchao hidden, bitsandbytes' compiles deferred
    import torch

    device = torch.device(args.device if args.device == "cpu" or torch.cuda.is_available() else "cpu")
    out: dict[str, Any] = {"asked_device": args.device, "device_used": str(device)}
    _check(out, "versions", versions)
    _check(out, "device_info", lambda: device_info(device))
    _check(out, "bitsandbytes_binary", bnb_binary)
    if device.type == "cuda":
        torch.empty(1, device=device)  # a CUDA context, so NVML can see this process
    _check(out, "nf4_matmul", lambda: nf4_matmul(device))
    _check(out, "paged_adamw_8bit", lambda: paged_adamw(device))
    _check(out, "nvml", nvml)
    from harness.measure.energy import energy_source

    _check(out, "energy_counter", lambda: energy_source(device))
    text = json.dumps(out, indent=1, default=str)
    print(text)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text + "\n")
    optional = {"nvml"} if device.type == "cpu" else set()  # a CPU machine has no NVML to see it
    failed = [k for k, v in out.items() if isinstance(v, dict) and "error" in v and k not in optional]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
