"""Suite runner: expand the grid, run each cell in its own process, record, resume, summarise.

Each cell runs in a process of its own (:mod:`harness.driver.executor`) so that one crash cannot take the suite down
and peak memory (RSS) belongs to exactly one run. Cells that already have a record are skipped (resume);
``--retry-failed`` reruns those whose status is not ``ok``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from harness.atomic import atomic_write_text
from harness.driver import forkserver
from harness.driver.diskwatch import DiskWatch
from harness.driver.pools import make_pool, run_all
from harness.driver.suite import expand
from harness.progress import SuiteEta, interrupts_raise
from harness.records import RunRecord, cell_identity, read_record, record_path, write_record
from harness.schema import RUN_SETTINGS, RunConfig, Suite


class ResultsLocked(Exception):
    """Another runner holds the results directory."""


def _in_use(results_dir: Path, holder: str) -> ResultsLocked:
    return ResultsLocked(
        f"{results_dir} is in use by another ftbench run (pid {holder}); wait for it to finish "
        "or use another --results directory"
    )


def check_unlocked(results_dir: Path) -> None:
    """Refuse at once, writing nothing, where another runner holds ``results_dir`` (the CLI asks before the
    checks that import torch; :func:`lock_results` takes the lock itself later)."""
    import fcntl

    path = Path(results_dir) / ".ftbench.lock"
    if not path.is_file():
        return
    with open(path) as fh:  # read-only: flock needs no write access, and nothing is written
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise _in_use(results_dir, fh.read().strip() or "?") from None


def lock_results(results_dir: Path):
    """An exclusive, non-blocking lock on the results dir for the whole suite; released when the process ends
    (even by SIGKILL), so a stale lock cannot outlive its runner."""
    import fcntl

    fh = open(results_dir / ".ftbench.lock", "a+")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.seek(0)
        holder = fh.read().strip() or "?"
        fh.close()
        raise _in_use(results_dir, holder) from None
    fh.seek(0)
    fh.truncate()
    fh.write(str(os.getpid()))
    fh.flush()
    return fh


def pending_cells(cells: list[RunConfig], results_dir: Path, retry_failed: bool) -> list[RunConfig]:
    """The cells without a record (and, with ``retry_failed``, those whose record is not ok)."""
    out = []
    for c in cells:
        p = record_path(results_dir, c.cell_id)
        if not p.exists():
            out.append(c)
        elif retry_failed:
            try:
                if read_record(p).status != "ok":
                    out.append(c)
            except ValueError:  # unreadable record: run again
                out.append(c)
    return out


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def _unreadable(p: Path) -> bool:
    try:
        read_record(p)
    except ValueError:
        return True
    return False


def _export_folders(p: Path) -> set[str]:
    """The folders under exports/ that hold record ``p``'s artifacts: its id's, and those its exports name (an
    earlier ftbench named them by the config with its `auto` dtypes resolved; a record kept under a new id keeps
    its folder). Only folders of the same cell identity: a record never moves another cell's artifacts."""
    try:
        folders = {Path(e.get("path") or "").parent.name for e in json.loads(p.read_text()).get("exports") or []}
    except (OSError, ValueError, AttributeError):
        folders = set()
    return {p.stem} | {n for n in folders if n and cell_identity(n) == cell_identity(p.stem)}


def set_aside_stale(cells: list[RunConfig], results_dir: Path, selected: set[str] | None = None) -> list[str]:
    """Records in ``results_dir`` that belong to no cell of this suite (a config changed since they ran, or the
    cell is gone) move to ``stale/<time>/``: kept, never mixed with this suite's. Returns what to tell the user:
    one line per changed cell with what changed, and where the records went; a changed cell outside ``selected``
    (the ids this run runs: --only) is said to wait for a later run."""
    import datetime
    import shutil

    current = {c.cell_id: c for c in cells}
    by_identity = {cell_identity(c.cell_id): c for c in cells}
    stale = [p for p in sorted((results_dir / "records").glob("*.json")) if p.stem not in current or _unreadable(p)]
    if not stale:
        return []
    lines, kept = [], []
    for p in stale:
        if p.stem in current:  # a cut-short copy, an edit: not a record, so the cell has none and runs again
            c = current[p.stem]
            lines.append(f"unreadable record, rerunning: {c.method}/{c.variant} s{c.seed} on {c.task.display_name}")
            continue
        cell = by_identity.get(cell_identity(p.stem))
        if cell is None:
            continue
        try:
            old = _flat(json.loads(p.read_text()).get("config", {}))
        except (OSError, ValueError):
            old = {}
        new = _flat(cell.model_dump(mode="json"))
        keys = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
        if old and all(k in RUN_SETTINGS for k in keys) and not record_path(results_dir, cell.cell_id).exists():
            # the same measurement under other run settings (or an id from an ftbench that hashed them): kept
            try:
                write_record(results_dir, read_record(p).model_copy(update={"cell_id": cell.cell_id}))
            except ValueError:  # not a record we can read: set aside below with the rest
                pass
            else:
                p.unlink()
                kept.append(p)
                continue
        changed = [f"{k} {old.get(k)!r} → {new.get(k)!r}" for k in keys]
        what = "; ".join(changed[:3]) + (" …" if len(changed) > 3 else "") if old else "its old record is unreadable"
        verb = "rerunning" if selected is None or cell.cell_id in selected else "not rerun now (left out by --only)"
        lines.append(
            f"config changed, {verb}: {cell.method}/{cell.variant} s{cell.seed} on {cell.task.display_name} ({what})"
        )
    changed_cells = len(lines)
    if kept:
        lines.insert(
            0,
            f"{len(kept)} record(s) kept under a new cell id: an older ftbench's id, or only run settings "
            f"({', '.join(RUN_SETTINGS)}) changed",
        )
    stale = [p for p in stale if p not in kept]
    if not stale:
        return lines
    dest = results_dir / "stale" / datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    dest.mkdir(parents=True, exist_ok=True)
    exports = 0
    for p in stale:
        folders = _export_folders(p) - current.keys()
        shutil.move(str(p), dest / p.name)
        for name in sorted(folders):  # the record's artifacts go with it: exports/ holds this suite's cells only
            if (artifacts := results_dir / "exports" / name).is_dir():
                (dest / "exports").mkdir(exist_ok=True)
                shutil.move(str(artifacts), dest / "exports" / name)
                exports += 1
    others = len(stale) - changed_cells
    gone = f" ({others} of cells this suite no longer has)" if others else ""
    and_exports = f" with {exports} export folder(s)" if exports else ""
    lines.append(f"{len(stale)} earlier record(s){gone}{and_exports} moved to {dest}: never mixed with this suite's")
    return lines


def _before_cells(todo: list[RunConfig], results_dir: Path, console) -> None:
    """Hardware identity at the top of the output; one warning line for half-precision dtypes asked for
    explicitly where this machine emulates them; this machine's peak matmul rate for each dtype the cells will
    run in, before any cell (cached per machine, and the suite's figure kept on resume: harness/measure/flops.py).
    In a fork of the cells' zygote where there is one (harness/driver/torchside.py): it needs torch."""
    from harness.driver import torchside

    for server in forkserver.running():  # its imports must not load the machine while the peak is measured
        server.wait_ready()
    cells = [c.model_dump_json() for c in todo]
    lines = torchside.call(
        "harness.driver.runner:machine_facts", todo[0].allow_network, cells=cells, results=str(results_dir)
    )
    for line in lines:
        console.print(line, soft_wrap=True)


def machine_facts(cells: list[str], results: str) -> list[str]:
    """What :func:`_before_cells` shows, for the cells given as JSON; the peaks are measured (or read) on the way."""
    from harness.cell.run import resolve_dtypes
    from harness.environment import describe
    from harness.measure.flops import mfu_dtype, peak_flops
    from harness.measure.hardware import default_device, identity, slow_note
    from harness.registry import build_method, load_method_file

    todo = [RunConfig.model_validate_json(c) for c in cells]
    device = default_device(todo[0].device)  # one device for the whole suite (its `device:` or --device)
    lines = [f"hardware: {describe(identity(device))}"]
    slow: dict[str, set[str]] = {}
    needed: set[str] = set()
    for c in todo:
        if c.method_source:  # a method from a file beside the suite: registered in this process too
            load_method_file(c.method_source)
        resolved_cfg, dtypes = resolve_dtypes(c, device)
        method = build_method(resolved_cfg.method, resolved_cfg.method_config)
        needed.add(mfu_dtype(resolved_cfg.train.dtype, method.compute_dtype(), device))
        for field, d in dtypes.items():
            note = slow_note(d["value"], device) if d["choice"] != "auto" else None
            if note:
                slow.setdefault(note, set()).add(f"{c.method}/{c.variant} {field}={d['value']}")
    for note, where in slow.items():  # one line per reason, before anything trains
        where_text = ", ".join(sorted(where))
        lines.append(f"[yellow]warning:[/] {note}, yet set explicitly: {where_text}; `auto` avoids it")
    for dtype in sorted(needed):
        peak_flops(Path(results), dtype, device)
    return lines


def run_suite(
    suite: Suite,
    suite_text: str,
    results_dir: Path,
    retry_failed: bool = False,
    quiet: bool = False,
    executor: str = "local",
    address: str | None = None,
    only: list[str] | None = None,
    jobs: int = 1,
) -> list[RunRecord]:
    """Run every pending cell of ``suite`` (with a ``tune:`` block, its trials first and then the grid at each
    method's best), those matching ``only`` (:func:`select_cells`) if given, ``jobs`` at a time; return the
    records of all its cells (old and new)."""

    results_dir = Path(results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    lock = lock_results(results_dir)  # held until this function returns (or the process dies): once, tuning too
    try:
        return _run_locked(suite, suite_text, results_dir, retry_failed, quiet, executor, address, only, jobs)
    finally:
        forkserver.close_all()  # the zygotes served the trials and the cells alike
        lock.close()


def _run_locked(suite, suite_text, results_dir, retry_failed, quiet, executor, address, only, jobs):
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    atomic_write_text(results_dir / "suite.yaml", suite_text)
    console = Console(stderr=True, quiet=quiet)
    cells = expand(suite)
    if suite.tune is not None:  # the trials first, then the grid at each method's best
        base = [c for c in cells if c.seed == suite.seeds[0]]
        _before_cells(base, results_dir, console)
        cells = _tuned(suite, cells, base, results_dir, console, executor, address)
    selected = select_cells(cells, only) if only else cells
    for line in set_aside_stale(cells, results_dir, {c.cell_id for c in selected}):
        console.print(f"[yellow]{line}[/]", soft_wrap=True)
    todo = pending_cells(selected, results_dir, retry_failed)
    if todo and suite.tune is None:  # a tuned suite measured this machine before its trials
        _before_cells(todo, results_dir, console)
    left_out = f", {len(cells) - len(selected)} left out by --only" if only else ""
    console.print(
        f"[bold]{suite.name}[/]: {len(cells)} cells, {len(selected) - len(todo)} already recorded, {len(todo)} to run"
        f"{left_out} → {results_dir}"
    )
    interrupts_raise()  # cells are about to run: Ctrl-C now says that finished runs are recorded
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        TextColumn("{task.fields[eta]}"),
        console=console,
        transient=False,
    ) as progress:
        bar = progress.add_task("", total=len(todo), eta="")
        # on Ray the cluster decides how many cells run at once: no ETA there rather than a wrong one
        configurations = {c.cell_id: f"{c.model.name}/{c.task.display_name}/{c.method}/{c.variant}" for c in todo}
        eta = SuiteEta(configurations, jobs if executor != "ray" else 0)
        disk = DiskWatch(configurations, results_dir)

        def label(cfg: RunConfig) -> str:
            return f"{cfg.model.name} · {cfg.task.display_name} · {cfg.method}/{cfg.variant}"

        running: dict[str, str] = {}  # cell -> its newest progress line, shown together on the bar

        def show_for(cfg: RunConfig):  # asked as the cell goes into the pool
            def show(line: str) -> None:
                running[cfg.cell_id] = f"{label(cfg)} · {line}"
                progress.update(bar, description=" | ".join(list(running.values())), eta=eta.text())

            show("starting")
            return show

        def done(cfg: RunConfig, rec: RunRecord) -> None:
            running.pop(cfg.cell_id, None)
            mark = "[green]ok[/]" if rec.status == "ok" else f"[red]{rec.status}[/]"
            progress.console.print(f"{mark} {label(cfg)} · seed {cfg.seed} ({rec.wall_time_s:.1f} s)")
            eta.finished(cfg.cell_id, rec.wall_time_s)
            if warning := disk.finished(cfg.cell_id, rec.export_bytes):
                progress.console.print(f"[yellow]warning:[/] {warning}", soft_wrap=True)
            progress.update(bar, advance=1, eta=eta.text())

        if todo:  # a resume with nothing left to run starts no pool (nor a Ray cluster)
            pool = make_pool(executor, address, jobs, ray_slots=len(todo))
            if executor == "ray":
                progress.update(bar, description=f"on Ray ({address or 'local cluster'})")
            try:
                run_all(pool, todo, results_dir, show_for, done)
            finally:
                pool.close()
        progress.update(bar, description="cells done")  # not the last cell's last stage, left on screen
    records = []
    for c in cells:
        p = record_path(results_dir, c.cell_id)
        if p.exists():
            try:
                records.append(read_record(p))
            except ValueError as err:
                console.print(f"[red]unreadable record[/] {p}: {str(err).splitlines()[0]}")
    atomic_write_text(results_dir / "cells_index.json", json.dumps([c.cell_id for c in cells], indent=1))
    from reports.card import write_missing_cards

    try:  # records resumed from an ftbench before the model cards get theirs
        write_missing_cards(records)
    except OSError as err:
        console.print(f"[yellow]model cards not written:[/] {err}")
    return records


def cell_key(cfg: RunConfig) -> str:
    """``model/task/method/variant/seed``: what ``--only`` matches (a model path by its last part)."""
    model = cfg.model.name.rstrip("/").rsplit("/", 1)[-1]
    return f"{model}/{cfg.task.display_name}/{cfg.method}/{cfg.variant}/{cfg.seed}"


def select_cells(cells: list[RunConfig], patterns: list[str]) -> list[RunConfig]:
    """The cells whose key (:func:`cell_key`) matches one of the shell-style ``patterns``, whole or in any run
    of consecutive parts: ``lora`` is every lora cell (not qlora's), ``lora/r8``, ``rotten_tomatoes/*/*/0``."""
    import fnmatch

    def hit(cfg: RunConfig) -> bool:
        parts = cell_key(cfg).split("/")
        runs = ["/".join(parts[i:j]) for i in range(len(parts)) for j in range(i + 1, len(parts) + 1)]
        return any(fnmatch.fnmatchcase(r, p) for p in patterns for r in runs)

    return [c for c in cells if hit(c)]


def _tuned(suite: Suite, grid, base, results_dir: Path, console, executor: str, address: str | None) -> list[RunConfig]:
    """The suite's grid with each (model, task, method/variant) at its best hyperparameters on the validation
    split (harness/driver/tune.py): the trials run first, one cell each, in the local executor (one at a time) or
    on Ray (the studies side by side). A bar per study: trials done and pruned, the best value so far, the
    running trial's latest step. The caller holds the lock and has measured this machine."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Column

    from harness.driver.tune import tune_cells, with_params

    pool = make_pool(executor, address, jobs=1, ray_slots=len(base))  # local trials: one at a time
    interrupts_raise()
    # the study's text folds onto more lines rather than being cut (the best value and the trial must show)
    text = TextColumn("{task.fields[text]}", table_column=Column(overflow="fold", ratio=1))
    columns = (TextColumn("{task.description}"), BarColumn(bar_width=20), text)
    # piped to a log, the bars would print once at the end, folded to the log's 80 columns: the lines that
    # say() prints per trial carry the same figures
    live = console.is_terminal
    with Progress(*columns, TimeElapsedColumn(), console=console, transient=False, disable=not live) as progress:
        bars: dict[str, int] = {}

        def status(key: str, text: str, done: int, total: int) -> None:
            name = "tune " + " · ".join(key.split("|")[:3])
            if key not in bars:
                bars[key] = progress.add_task(name, total=total, text="")
            progress.update(bars[key], completed=done, total=total, text=text)

        finals = tune_cells(suite, base, results_dir, pool, lambda s: progress.console.print(s, soft_wrap=True), status)
    best = {(c.model.name, c.task.display_name, c.method, c.variant): c for c in finals}
    out = []
    for c in grid:
        b = best[(c.model.name, c.task.display_name, c.method, c.variant)]
        out.append(with_params(c, (b.tuning or {}).get("best_params", {}), tuning=b.tuning) if b.tuning else c)
    return out
