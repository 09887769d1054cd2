"""Progress inside a cell: the cell's process says where it is; the runner shows it.

A cell prints one line per stage and, while training, a step line at most once a second (and at the first and
last step) to its stdout, which is its log: ``[ftbench] step 12/150 · 0.68 s/step · ETA 1m 32s``. A cell that
is slow for a reason it knows says so in that line: a dtype that this machine emulates (bf16 on an AVX2 CPU),
the system swapping, or other processes taking the cores. The runner tails the log and shows the latest line
beside the cell's name, so a slow cell is never a frozen bar.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import time
from pathlib import Path

MARK = "[ftbench] "


def fmt_duration(seconds: float) -> str:
    """Seconds as a short duration: ``45s``, ``3m12s``, ``1h05m``."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    m, s = divmod(seconds, 60)
    return f"{m}m {s:02d}s" if m < 60 else f"{m // 60}h {m % 60:02d}m"


class SuiteEta:
    """The suite's time left, from the cells finished so far: a pending cell is expected to take what the
    finished cells of its configuration took (its other seeds), else what the finished cells took on average;
    ``parallel`` cells side by side (--jobs N) share the wait; it counts down from the last finish (not below
    zero). Nothing until a cell has finished, nor with ``parallel`` 0 (unknown: a Ray cluster's)."""

    def __init__(self, configuration_of: dict[str, str], parallel: int = 1, clock=time.monotonic) -> None:
        self.configuration_of, self.parallel, self.clock = configuration_of, parallel, clock
        self.took: dict[str, list[float]] = {}  # configuration -> wall seconds of its finished cells
        self.left = set(configuration_of)
        self.at = clock()

    def finished(self, cell_id: str, seconds: float) -> None:
        self.left.discard(cell_id)
        self.took.setdefault(self.configuration_of[cell_id], []).append(seconds)
        self.at = self.clock()

    def seconds(self) -> float | None:
        if not self.took or not self.left or self.parallel < 1:
            return None
        every = [x for xs in self.took.values() for x in xs]
        mean = {k: sum(xs) / len(xs) for k, xs in self.took.items()}
        overall = sum(every) / len(every)
        total = sum(mean.get(self.configuration_of[c], overall) for c in self.left) / self.parallel
        return max(0.0, total - (self.clock() - self.at))

    def text(self) -> str:
        s = self.seconds()
        return "" if s is None else f"ETA ~{fmt_duration(s)}"


def interrupted_before_work(signum, frame) -> None:
    """Ctrl-C while ftbench imports its libraries and validates: nothing is being written yet, so end here, in
    one line. (A KeyboardInterrupt raised inside a library's import can be swallowed by its own bare
    ``except``, and the run would go on as if nothing happened.)"""
    import sys

    print("ftbench: interrupted", file=sys.stderr, flush=True)
    os._exit(130)


@contextlib.contextmanager
def interrupts_raise_here():
    """Ctrl-C raises KeyboardInterrupt inside the block, where no library import can swallow it, so the block's
    own cleanup runs (its temporary folder is removed) before the one line; the handler before comes back after."""
    import signal
    import threading

    main, before = threading.current_thread() is threading.main_thread(), signal.getsignal(signal.SIGINT)
    if main:  # only the main thread may set a handler
        interrupts_raise()
    try:
        yield
    finally:
        if main:
            signal.signal(signal.SIGINT, before)


def interrupts_raise() -> None:
    """From here on Ctrl-C raises KeyboardInterrupt again: the work under way says what it leaves behind."""
    import signal

    if signal.getsignal(signal.SIGINT) is interrupted_before_work:
        signal.signal(signal.SIGINT, signal.default_int_handler)


class CellProgress:
    """The cell's side: stage lines and rate-limited step lines, with the known reasons for slowness."""

    def __init__(self, cfg, resolved_dtypes: dict[str, dict[str, str]], device, interval_s: float = 1.0) -> None:
        from harness.measure.hardware import slow_note

        self.interval_s = interval_s
        self._last_print = 0.0
        self._times: list[float] = []
        notes = {slow_note(v["value"], device) for v in resolved_dtypes.values()}
        self.notes = sorted(n for n in notes if n)
        self._swap = _swap_bytes()
        self._swap_t = time.monotonic()

    def say(self, text: str) -> None:
        print(MARK + text, flush=True)

    def step(self, done: int, total: int, step_time_s: float) -> None:
        self._times.append(step_time_s)
        now = time.monotonic()
        if done not in (1, total) and now - self._last_print < self.interval_s:
            return
        self._last_print = now
        rate = statistics.median(self._times[-10:])  # recent steps: the warm-up's slow first steps fade out
        line = f"step {done}/{total} · {rate:.2f} s/step · ETA {fmt_duration(rate * (total - done))}"
        slow = self.notes + self._contention()
        self.say(line + (" · slow: " + "; ".join(slow) if slow else ""))

    def _contention(self) -> list[str]:
        """Swapping and an overloaded machine, measured since the last line."""
        out = []
        swap, now = _swap_bytes(), time.monotonic()
        if swap is not None and self._swap is not None:
            rate = (swap - self._swap) / max(now - self._swap_t, 1e-3)
            if rate > 1 << 20:
                out.append(f"system swapping ({rate / 2**20:.0f} MiB/s)")
        self._swap, self._swap_t = swap, now
        cores = os.cpu_count() or 1
        load = os.getloadavg()[0]
        if load > cores + 1:  # this run itself accounts for up to one load per core
            out.append(f"machine busy (load {load:.1f} on {cores} cores)")
        return out


def _swap_bytes() -> int | None:
    try:
        import psutil

        s = psutil.swap_memory()
        return s.sin + s.sout
    except Exception:  # no swap accounting on this platform
        return None


class LogTail:
    """The runner's side: a cell's progress lines, read incrementally from its log."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._offset = 0
        self._partial = b""
        self.latest: str | None = None

    def poll(self) -> list[str]:
        """Read what the log gained since the last poll; return its new complete progress lines, oldest first.

        Every line, not only the newest: a stage that starts and ends between two polls (evaluating a small test
        split on a fast machine) is still passed on, so what the runner is told does not depend on timing."""
        try:
            with open(self.path, "rb") as fh:
                fh.seek(self._offset)
                chunk = fh.read()
        except OSError:
            return []
        self._offset += len(chunk)
        *lines, self._partial = (self._partial + chunk).split(b"\n")
        new = [t[len(MARK) :] for raw in lines if (t := raw.decode(errors="replace").strip()).startswith(MARK)]
        if new:
            self.latest = new[-1]
        return new
        self._offset += len(chunk)
        *lines, self._partial = (self._partial + chunk).split(b"\n")
        for raw in lines:
            text = raw.decode(errors="replace").strip()
            if text.startswith(MARK):
                self.latest = text[len(MARK) :]
        return self.latest
