"""ftbench's per-machine cache folder (no torch here: the driver's cheap checks read it too)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """ftbench's per-machine cache: ``$FTBENCH_CACHE_DIR``, else ``$XDG_CACHE_HOME/ftbench``."""
    env = os.environ.get("FTBENCH_CACHE_DIR")
    return Path(env) if env else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ftbench"
