"""Where the memory goes: live tensor bytes of a training step, by category.

A ``TorchDispatchMode`` sees every tensor an operator creates — in forward, in backward (autograd carries the
mode into the engine) and in the optimizer step — and a ``weakref`` finaliser on each storage sees it die.
Every allocation and free is logged with a sequence number; storages are counted once however many views
point at them. Categories are settled when the step ends, then the log is replayed, so a tensor's category
at the peak is its final one (a gradient is a gradient even while backward is still writing it):

  params_trainable, params_frozen, params_quantized (packed low-bit weights and their constants), buffers,
  inputs — tensors that existed before the step;
  gradients — ``.grad`` of a parameter when the optimizer step begins;
  optimizer_state — tensors in ``optimizer.state`` after the step;
  activations — created in forward and saved for backward (``saved_tensors_hooks``);
  temporaries — everything else (forward intermediates, backward scratch, optimizer scratch).

Limit: tensors without a plain storage (some tensor subclasses, e.g. DTensor shards' wrappers) are not
counted; every tensor ftbench's methods create (incl. bitsandbytes Params4bit) has one.

Results: the total peak, each category's bytes *at* that peak, and each category's own maximum. This is what
tensors held — not what the allocator reserved, not the process RSS — on CPU as on CUDA.
"""

from __future__ import annotations

import contextlib
import itertools
import weakref
from collections import defaultdict
from collections.abc import Iterable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

CATEGORIES = (
    "params_trainable",
    "params_frozen",
    "params_quantized",
    "buffers",
    "inputs",
    "gradients",
    "optimizer_state",
    "activations",
    "temporaries",
)


class MemoryTracker(TorchDispatchMode):
    """Live tensor bytes by category during a training step, from every allocation and free it sees."""

    def __init__(self, roots: dict[str, Iterable[torch.Tensor]] | None = None, device_type: str = "cpu") -> None:
        super().__init__()
        self.device_type = device_type
        self._uid: dict[int, int] = {}  # live storage (cdata) -> uid
        self._bytes: dict[int, int] = {}  # uid -> bytes
        self._category: dict[int, str] = {}  # uid -> category (provisional until finish)
        self._saved: set[int] = set()
        self._log: list[tuple[int, int]] = []  # (uid, +bytes | -bytes)
        self._ids = itertools.count()
        self._closed = False
        self.phase = "forward"
        for cat, tensors in (roots or {}).items():
            for t in tensors:
                self._track(t, cat)

    # --- bookkeeping -------------------------------------------------------------------------------------
    def _storage(self, t: object):
        if not isinstance(t, torch.Tensor) or t.device.type != self.device_type or t.is_meta:
            return None
        try:
            return t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # tensor subclasses without a plain storage
            return None

    def _track(self, t: object, category: str | None = None) -> int | None:
        st = self._storage(t)
        if st is None:
            return None
        key = st._cdata
        if key in self._uid:
            return self._uid[key]
        uid = next(self._ids)
        self._uid[key], self._bytes[uid] = uid, st.nbytes()
        self._category[uid] = category or ("temporaries" if self.phase != "forward" else "forward")
        self._log.append((uid, st.nbytes()))
        weakref.finalize(st, self._free, key, uid)
        return uid

    def _free(self, key: int, uid: int) -> None:
        if self._uid.get(key) == uid:
            del self._uid[key]
        if not self._closed:  # after result(), frees no longer change the step's figures
            self._log.append((uid, -self._bytes[uid]))

    def _mark(self, tensors: Iterable[torch.Tensor], category: str) -> None:
        for t in tensors:
            uid = self._track(t)
            if uid is not None:
                self._category[uid] = category

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            self._track(t)
        return out

    # --- what the training loop tells the tracker --------------------------------------------------------
    @contextlib.contextmanager
    def forward(self):
        """Forward pass: tensors saved for backward are activations."""
        self.phase = "forward"

        def pack(t):
            uid = self._track(t)
            if uid is not None:
                self._saved.add(uid)
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield
        self.phase = "backward"

    def gradients_ready(self, params: Iterable[torch.nn.Parameter]) -> None:
        self._mark([p.grad for p in params if p.grad is not None], "gradients")
        self.phase = "optimizer"

    def optimizer_done(self, optimizer: torch.optim.Optimizer) -> None:
        self._mark([v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)], "optimizer_state")

    # --- results -----------------------------------------------------------------------------------------
    @property
    def current_bytes(self) -> int:
        """Bytes of the tracked storages alive right now."""
        return sum(self._bytes[u] for u in self._uid.values())

    def result(self) -> dict:
        """Replay the log with final categories: total peak, the breakdown at it, each category's own max."""
        self._closed = True
        cat = {
            u: ("activations" if u in self._saved else "temporaries") if c == "forward" else c
            for u, c in self._category.items()
        }
        current: dict[str, int] = defaultdict(int)
        own_max: dict[str, int] = defaultdict(int)
        total = peak = 0
        at_peak: dict[str, int] = {}
        for uid, delta in self._log:
            c = cat[uid]
            current[c] += delta
            total += delta
            own_max[c] = max(own_max[c], current[c])
            if total > peak:
                peak, at_peak = total, dict(current)
        return {
            "peak_bytes": peak,
            "at_peak_bytes": {c: at_peak.get(c, 0) for c in CATEGORIES if c in own_max},
            "category_max_bytes": {c: own_max[c] for c in CATEGORIES if c in own_max},
        }


class NullTracker:
    """Stands in for MemoryTracker on untracked steps, so the loop has no ``if tracking`` branches."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None

    def forward(self):
        return contextlib.nullcontext()

    def gradients_ready(self, params) -> None:
        pass

    def optimizer_done(self, optimizer) -> None:
        pass


def step_roots(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batches: list[dict]) -> dict[str, list]:
    """Tensors alive when a step begins, by category. Quantized weights: bitsandbytes ``Params4bit`` (and the
    tensors of its quant_state), and buffers of modules that report ``quantized_numel`` (QA-LoRA)."""
    roots: dict[str, list] = defaultdict(list)
    quant_modules = [m for m in model.modules() if callable(getattr(m, "quantized_numel", None))]
    quant_buffers = {id(b) for m in quant_modules for b in m.buffers(recurse=False)}
    for p in model.parameters():
        qs = getattr(p, "quant_state", None)
        if qs is not None:
            roots["params_quantized"].append(p)
            roots["params_quantized"] += _quant_state_tensors(qs)
        else:
            roots["params_trainable" if p.requires_grad else "params_frozen"].append(p)
        if p.grad is not None:
            roots["gradients"].append(p.grad)
    for b in model.buffers():
        roots["params_quantized" if id(b) in quant_buffers else "buffers"].append(b)
    roots["optimizer_state"] += [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    roots["inputs"] += [t for b in batches for t in b.values()]
    return roots


def _quant_state_tensors(qs) -> list[torch.Tensor]:
    out = [getattr(qs, n) for n in ("absmax", "code", "offset") if torch.is_tensor(getattr(qs, n, None))]
    state2 = getattr(qs, "state2", None)
    return out + (_quant_state_tensors(state2) if state2 is not None else [])


def nvml_process_bytes() -> int | None:
    """GPU memory NVML attributes to this process (what nvidia-smi shows: allocator reserve + CUDA context),
    or None where NVML (the ``nvidia-ml-py`` package and a driver) is unavailable."""
    import os

    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        total = 0
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
                if proc.pid == os.getpid() and proc.usedGpuMemory:
                    total += proc.usedGpuMemory
        return total
    except pynvml.NVMLError:
        return None


def memtracker_peak_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer, step) -> dict[str, int]:
    """Cross-check with torch's own ``torch.distributed._tools.mem_tracker.MemTracker`` over one step.

    Two changes make it usable here: it registers gradient hooks on every parameter and fails on frozen ones
    ("cannot register a hook on a tensor that doesn't require gradient") — so gradient hooks go on trainable
    parameters only; and it refuses a second iteration — so call this after a warm-up step, once."""
    from torch.distributed._tools.mem_tracker import MemTracker, _MemRefType

    class FrozenSafe(MemTracker):
        def __init__(self) -> None:
            super().__init__()
            self._ftb_hooks: dict = {}

        def _track_module_params_and_buffers(self, module, install_grad_hooks=True):
            out = super()._track_module_params_and_buffers(module, install_grad_hooks=False)
            for p in module.parameters() if install_grad_hooks else ():
                if p.requires_grad and p not in self._ftb_hooks:
                    self._ftb_hooks[p] = p.register_post_accumulate_grad_hook(self._grad)
            return out

        def _grad(self, p: torch.Tensor) -> None:
            self._update_and_maybe_create_winfos(p.grad, _MemRefType.GRAD)

    mt = FrozenSafe()
    mt.track_external(model, optimizer)
    with mt:
        step()
    for h in mt._ftb_hooks.values():
        h.remove()
    snap = next(iter(mt.get_tracker_snapshot("peak").values()))
    return {str(k): int(v) for k, v in snap.items()}
