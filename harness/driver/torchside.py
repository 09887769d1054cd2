"""The driver's few steps that need torch, run where torch is imported already.

Two steps of ``ftbench run`` need torch: the suite's fit checks (optimizers built, each model's skeleton against
each task and method: harness/driver/suite.py) and the machine's facts before the first cell (dtypes resolved, the
peak matmul rate: harness/driver/runner.py). The cells' zygote imports torch anyway, so these steps run in a fork
of it, and the ``ftbench`` process itself never imports torch: importing it there too cost 4–6 s of CPU per
``ftbench run`` (2-core EPYC and Xeon, AVX2), beside the zygote's own import, on machines with two cores.

Where there is no zygote for the suite's cells (the Ray executor, a dry run, a GPU machine, FTBENCH_FORKSERVER=0),
or where this process has imported torch already (the tests, which call the CLI in-process), the step runs here.
"""

from __future__ import annotations

import importlib
import sys
import tempfile
from pathlib import Path
from typing import Any

from harness.driver import forkserver
from harness.progress import interrupts_raise_here


def call(target: str, allow_network: bool, **kwargs: Any) -> Any:
    """``module:function(**kwargs)``, JSON in and out: in a fork of the running zygote for cells with this network
    setting if there is one and torch is not imported here, else in this process."""
    server = _zygote(allow_network) if "torch" not in sys.modules else None
    if server is not None:
        # Ctrl-C here (the suite's checks, before any work) raises, so the folder goes with it
        with interrupts_raise_here(), tempfile.TemporaryDirectory(prefix="ftbench-call-") as workdir:
            try:
                return server.call(target, kwargs, Path(workdir))
            except RuntimeError as err:
                if isinstance(err, forkserver.CallFailed) or server.proc.poll() is None:
                    raise
                # the zygote died (killed, out of memory): the step runs here, as it would without one
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)(**kwargs)


def _zygote(allow_network: bool) -> forkserver.ForkServer | None:
    """The zygote already started for cells with this network setting (``ftbench run`` starts it early), if any."""
    env_key = forkserver.zygote_key(forkserver.cell_env(allow_network))
    return next((s for s in forkserver.running() if forkserver.zygote_key(s.env) == env_key), None)
