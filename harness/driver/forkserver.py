"""Cells as forks of a process that has already imported everything.

Each cell runs in a process of its own (a crash, a leak or an OOM stays in that cell; peak RSS belongs to one
run). Starting that process is costly: importing torch, transformers, peft, bitsandbytes and scikit-learn
takes 9–12 s on an AVX2 EPYC, which is more than a small cell's whole run. So the runner
starts one *zygote* per suite, which imports the libraries once, runs no torch op (no thread pool, no CUDA
context exists to be inherited), and then forks one child per cell. The child is what a fresh process was:
its own session (the runner kills its whole group on a timeout), it dies with its parent (PR_SET_PDEATHSIG;
the zygote dies with the runner the same way), its stdout and stderr in the cell's log, then ``run_cell``.
The zygote reports the child's exit status back over its stdout, one JSON line each.

Used for CPU runs from the local executor. Where CUDA is present the runner starts a fresh process per cell
as before (a CUDA context must never be forked); so it does for cells with ``memory_limit_mb`` (the preloaded
libraries would count against their address-space limit) and anywhere with ``FTBENCH_FORKSERVER=0``.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

# Modules a cell imports lazily. Not gptqmodel: hidden unless a cell quantizes with GPTQ (harness/libs.py).
WARM = (
    "transformers.models.bert.modeling_bert",
    "transformers.models.llama.modeling_llama",
    "bitsandbytes.nn",
    "safetensors.torch",
    "peft",  # every LoRA-family cell's method imports it at first use; 0.1–0.2 s a cell once torch is in
    "transformers.models.bert.tokenization_bert",  # transformers 5: the fast tokenizer lives here
)


def enabled() -> bool:
    """Cells fork from a zygote unless FTBENCH_FORKSERVER=0 or a GPU is there (a CUDA context does not survive a
    fork). Where torch is not imported yet, the GPU's device files answer, so that the runner can start the zygote
    before it imports torch itself."""
    if os.environ.get("FTBENCH_FORKSERVER", "1") == "0" or not hasattr(os, "fork"):
        return False
    if "torch" in sys.modules:
        return not sys.modules["torch"].cuda.is_available()
    import glob

    return not (glob.glob("/dev/nvidia[0-9]*") or os.path.exists("/dev/kfd"))


CHILD_ENV = {
    "TOKENIZERS_PARALLELISM": "false",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
}


def cell_env(allow_network: bool) -> dict[str, str]:
    """The environment a cell runs in: offline unless the suite allows the network."""
    env = {**CHILD_ENV, **os.environ}
    # Offline unless the suite opts in; with the network, fail in seconds rather than hang on an unreachable hub.
    env["HF_HUB_OFFLINE"] = "0" if allow_network else "1"
    if allow_network:
        env.setdefault("HF_HUB_ETAG_TIMEOUT", "10")
        env.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "10")
    return env


def die_with_parent() -> None:
    """Ask Linux to kill this process when its parent dies (PR_SET_PDEATHSIG)."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


_SERVERS: dict[str, ForkServer] = {}
# Read by ftbench while a cell runs, never by a library at import: each cell gets the runner's value when it is
# forked, so a different machine cache (a test's own, say) needs no zygote of its own.
RUNTIME_VARS = ("FTBENCH_CACHE_DIR", "FTBENCH_KEEP_LOADED_PEAK", "FTBENCH_JOBS", "FTBENCH_THREADS")


def zygote_key(env: dict[str, str]) -> str:
    """Zygotes are shared by cells whose environments differ in runtime variables only."""
    return json.dumps(sorted((k, v) for k, v in env.items() if k not in RUNTIME_VARS))


def server_for(allow_network: bool) -> ForkServer:
    """The zygote for cells with this network setting and this process's environment (libraries read
    HF_HUB_OFFLINE at import; the machine cache is found by FTBENCH_CACHE_DIR), started on first use;
    ``ftbench run`` starts the offline one early, so its imports overlap the suite's validation."""
    env = cell_env(allow_network)
    key = zygote_key(env)  # a zygote's children inherit its environment, so one per environment
    if key not in _SERVERS or _SERVERS[key].proc.poll() is not None:
        _SERVERS[key] = ForkServer(env)
    return _SERVERS[key]


def running() -> list[ForkServer]:
    """The fork servers still alive."""
    return [s for s in _SERVERS.values() if s.proc.poll() is None]


def close_all() -> None:
    """Close every fork server this process started."""
    while _SERVERS:
        _SERVERS.popitem()[1].close()


class ForkServer:
    """The runner's handle on its zygote: start a cell (returns its pid), poll for cells that ended."""

    def __init__(self, env: dict[str, str]) -> None:
        import tempfile

        self.ready = False
        self.env = env
        self._err = tempfile.TemporaryFile()  # the libraries' import noise: kept for an error, never shown
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "harness", "_zygote"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._err,
            env=env,  # read at import time by some libraries (HF_HUB_OFFLINE): one zygote per environment
            preexec_fn=die_with_parent,
        )
        self._buf = b""
        self.exited: dict[int, int] = {}  # pid -> return code (negative: killed by that signal)
        self._lock = threading.Lock()  # `--jobs N`: several runner threads start and wait on cells of one zygote

    def wait_ready(self) -> None:
        """Block until the zygote has imported everything (the runner measures the peak on a quiet machine)."""
        while not self.ready:
            self._read(timeout=None)

    def start(self, cell_file: Path, results_dir: Path, log: Path) -> int:
        with self._lock:  # the next pid message read is this request's
            return self._start({"cell_file": str(cell_file), "results": str(results_dir), "log": str(log)})

    def call(self, target: str, kwargs: dict[str, Any], workdir: Path) -> Any:
        """``module:function(**kwargs)`` (JSON in, JSON out) in a fork of the zygote, where torch is imported
        already: the driver's few steps that need torch (harness/driver/torchside.py). A ``ConfigError`` raised
        there is raised here again; any other exception is a :class:`CallFailed` with the child's traceback."""
        from harness.atomic import atomic_write_text
        from harness.schema import ConfigError

        request = workdir / "call.json"
        atomic_write_text(request, json.dumps({"target": target, "kwargs": kwargs}))
        with self._lock:
            pid = self._start({"call": str(request), "log": str(workdir / "call.log")})
        rc = self.wait(pid, timeout=3600.0)
        try:
            out = json.loads(request.with_suffix(".out.json").read_text())
        except (OSError, ValueError):
            log = (workdir / "call.log").read_text(errors="replace").strip().splitlines()[-5:]
            raise CallFailed(f"{target} ended with code {rc} and no answer: {' | '.join(log)}") from None
        if "config_error" in out:
            raise ConfigError(out["config_error"])
        if "error" in out:
            raise CallFailed(f"{out['error']}\n(in a fork of the cells' zygote)\n{out['traceback']}")
        return out["value"]

    def _start(self, req: dict[str, Any]) -> int:
        req["env"] = {k: os.environ.get(k) for k in RUNTIME_VARS}
        try:
            self.proc.stdin.write((json.dumps(req) + "\n").encode())
            self.proc.stdin.flush()
        except OSError as err:  # a dead zygote: the runner falls back to a fresh process
            raise RuntimeError(f"the cell fork server is gone ({err})") from err
        while True:
            for msg in self._read(timeout=None):
                if "pid" in msg and "rc" not in msg:
                    return msg["pid"]

    def wait(self, pid: int, timeout: float) -> int | None:
        """The cell's return code once it has ended, else None after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        with self._lock:  # another thread's cell may end meanwhile: _read files every exit under its own pid
            while pid not in self.exited:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._read(timeout=left)
            return self.exited.pop(pid)

    def _read(self, timeout: float | None) -> list[dict]:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            return []
        chunk = os.read(self.proc.stdout.fileno(), 65536)
        if not chunk:
            self._err.seek(0)
            tail = self._err.read().decode(errors="replace").strip().splitlines()[-5:]
            raise RuntimeError(f"the cell fork server exited (code {self.proc.wait()}): {' | '.join(tail)}")
        *lines, self._buf = (self._buf + chunk).split(b"\n")
        msgs = [json.loads(line) for line in lines if line.strip()]
        for m in msgs:
            self.ready = self.ready or m.get("ready", False)
            if "rc" in m:
                self.exited[m["pid"]] = m["rc"]
        return msgs

    def close(self) -> None:
        if self.proc.poll() is None and not self.ready:  # still importing: nothing of value to wait for
            self.proc.kill()
            self.proc.wait()
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _child(req: dict, protocol) -> None:
    """In the forked child: become what a fresh cell process was, run the cell, never return."""
    rc = 1
    try:
        os.close(protocol.fileno())  # only the zygote speaks to the runner
        os.setsid()
        die_with_parent()
        fd = os.open(req["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        sys.stdin.close()
        for k, v in req.get("env", {}).items():  # the runner's runtime variables, as a fresh process would have
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if "call" in req:
            rc = _answer(Path(req["call"]))
        else:
            from harness.cell.run import run_cell_file

            rc = run_cell_file(Path(req["cell_file"]), Path(req["results"]))
    except BaseException:  # noqa: BLE001 - whatever happened, the runner learns it from the exit code
        import traceback

        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)


class CallFailed(RuntimeError):
    """A :meth:`ForkServer.call` that raised something other than a user error, or died without an answer."""


def _answer(request: Path) -> int:
    """In the forked child: run the call in ``request``, write what it returned or raised beside it."""
    import importlib
    import traceback

    from harness.atomic import atomic_write_text
    from harness.schema import ConfigError

    spec = json.loads(request.read_text())
    module, _, name = spec["target"].partition(":")
    try:
        out = {"value": getattr(importlib.import_module(module), name)(**spec["kwargs"])}
    except ConfigError as err:
        out = {"config_error": str(err)}
    except Exception as err:  # noqa: BLE001 - the driver says it in one line, as it would have said it itself
        out = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}
    atomic_write_text(request.with_suffix(".out.json"), json.dumps(out))
    return 0


def _pidfd(pid: int) -> int | None:
    """A file descriptor that select() finds readable once child ``pid`` has ended; None where there is none."""
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):  # Python < 3.9 or Linux < 5.3: the zygote polls instead
        return None


def serve() -> int:
    """The zygote: import what every cell needs, then fork a child per request line on stdin."""
    die_with_parent()
    # The protocol gets a private copy of stdout; fd 1 goes to the log with stderr, so nothing a library prints
    # while importing (banners, warnings) can corrupt it.
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    import importlib

    import harness.cell.run  # noqa: F401 - the point: torch, transformers, peft, bitsandbytes, once
    from harness.registry import available_methods

    available_methods()  # entry points too
    for name in WARM:  # imported lazily on first use otherwise, in every cell again
        try:
            importlib.import_module(name)
        except ImportError:
            pass
    out.write(b'{"ready": true}\n')
    out.flush()
    stdin = sys.stdin.buffer.fileno()
    buf, live = b"", {}  # pid -> its pidfd (None where the kernel has none): readable once the child has ended
    while True:
        # Woken by a request or by a child's end, not by polling: a 0.2 s poll cost each cell 0.1 s on average,
        # which on `make test`'s few hundred small cells added up. Without pidfds (Linux < 5.3) it polls.
        fds = [stdin] + [fd for fd in live.values() if fd is not None]
        poll = None if all(fd is not None for fd in live.values()) else 0.2
        ready, _, _ = select.select(fds, [], [], poll)
        if stdin in ready:
            chunk = os.read(stdin, 65536)
            if not chunk:  # the runner closed the pipe: done (children still running die with us)
                out.flush()
                os._exit(0)  # an interpreter teardown of torch/transformers costs ~3 s and frees nothing we need
            *lines, buf = (buf + chunk).split(b"\n")
            for line in lines:
                req = json.loads(line)
                pid = os.fork()
                if pid == 0:
                    for fd in live.values():  # its siblings' ends are the zygote's business
                        if fd is not None:
                            os.close(fd)
                    _child(req, out)
                live[pid] = _pidfd(pid)
                out.write((json.dumps({"pid": pid}) + "\n").encode())
                out.flush()
        for pid in list(live):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                fd = live.pop(pid)
                if fd is not None:
                    os.close(fd)
                rc = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
                out.write((json.dumps({"pid": pid, "rc": rc}) + "\n").encode())
                out.flush()
