"""Whether the exports still to come fit on the results folder's disk, projected from what each configuration's
cells have already written: a merged 8B model in float32 is 32 GB, and a suite writes one per cell.

A projection from measured sizes, not an estimate from the method: the first cell of a configuration (model,
task, method, variant) to finish says how much its seeds will write. The warning comes once, as soon as the cells
left would write more than the disk has free; the exports that fail for lack of room are each an export error
(the run stays ok: harness/cell/exports.py), and a record that cannot be written is one line (tests/test_faults.py).
"""

from __future__ import annotations

import shutil
from pathlib import Path

GIB = 2**30


class DiskWatch:
    """Fed each finished cell's ``export_bytes``; says when the cells left would outgrow the free space."""

    def __init__(self, configurations: dict[str, str], results_dir: Path) -> None:
        self.configuration = configurations  # cell id -> its configuration (the cells still to run)
        self.left = set(configurations)
        self.results_dir = Path(results_dir)
        self.bytes_per_cell: dict[str, int] = {}
        self.warned = False

    def finished(self, cell_id: str, export_bytes: int | None) -> str | None:
        """The warning, the first time the exports projected for the cells left exceed the free space."""
        self.left.discard(cell_id)
        key = self.configuration.get(cell_id)
        if key is not None and export_bytes:
            self.bytes_per_cell[key] = max(self.bytes_per_cell.get(key, 0), export_bytes)
        if self.warned:
            return None
        coming = sum(self.bytes_per_cell.get(self.configuration[c], 0) for c in self.left)
        free = shutil.disk_usage(self.results_dir).free
        if coming <= free:
            return None
        self.warned = True
        return (
            f"disk: the {len(self.left)} cells left would export about {coming / GIB:.1f} GiB (as much as each "
            f"configuration's finished cells wrote), and {self.results_dir} has {free / GIB:.1f} GiB free: an "
            "export without room fails alone (its run stays ok). Set `export: false` in the suite, or free space"
        )
