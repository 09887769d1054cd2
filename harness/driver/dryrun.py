"""``ftbench run SUITE --dry-run``: the plan before a run. The suite is validated in full, nothing is written, and
each cell is listed with its estimated peak memory by category (harness/measure/plan.py), whether that fits
this machine (the suite's ``memory_limit_mb``, else RAM or the GPU's memory) and an estimated time. A cell
that will not fit is named before anything starts."""

from __future__ import annotations

from typing import Any

from harness.measure.plan import ASSUMED_MFU, PROCESS_OVERHEAD_BYTES, WEIGHT_BYTES, estimate_run, machine_memory_bytes

GIB = 2**30


def _flops_per_step(cfg, model, trainable: float, batch: tuple[float, float] | None = None) -> float:
    """Forward 2·P, backward through the layers 2·P, weight gradients 2·T FLOPs per token (P: matmul weights,
    the output head included; T: trainable ones) and attention's 12·L·d per (query, key) pair of a row
    (harness/measure/flops.py counts the same), over a step's micro-batches: ``batch`` (computed tokens, pairs) as
    the task's own batches come (their padded length), else every row at max_seq_len."""
    import torch

    from harness.measure.flops import attention_dims

    p = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    rows, seq = cfg.train.batch_size, cfg.train.max_seq_len
    tokens, pairs = batch or (rows * seq, rows * seq**2)
    layers, width = attention_dims(model)
    return ((4 * p + 2 * min(trainable, p)) * tokens + 12 * layers * width * pairs) * cfg.train.grad_accum


def plan_rows(suite, cells: list, batches: dict[str, tuple[float, float]] | None = None) -> list[dict[str, Any]]:
    """One row per cell: its key, the estimate by category, the memory it needs and has, and the time (from the
    cell's own batches where ``batches`` has them: :func:`data_plan`)."""
    from harness.cell.models import resolve_mode, skeleton
    from harness.cell.run import resolve_dtypes
    from harness.driver.runner import cell_key
    from harness.measure.hardware import default_device, peak_matmul, slow_note

    device = default_device(suite.device)
    if suite.memory_limit_mb:
        capacity, where = suite.memory_limit_mb * 2**20, f"memory_limit_mb {suite.memory_limit_mb}"
    else:
        capacity, where = machine_memory_bytes(device.type)
    skeletons: dict[tuple[str, str], Any] = {}
    rows = []
    for cfg in cells:
        cfg, _ = resolve_dtypes(cfg, device)  # `auto` as the cell will resolve it here: bf16 where it is native
        mode = resolve_mode(cfg.model.name, cfg.model.mode, cfg.model.trust_remote_code) or "classifier"
        key = (cfg.model.name, mode)
        if key not in skeletons:
            skeletons[key] = skeleton(cfg.model.name, cfg.model.trust_remote_code, mode)
        model = skeletons[key]
        row: dict[str, Any] = {"cell": cell_key(cfg), "capacity": capacity, "where": where}
        if model is None:
            rows.append({**row, "why": "architecture unknown offline"})
            continue
        e = estimate_run(cfg, model, mode == "prompt", device_type=device.type)
        if "peak_bytes" not in e:
            rows.append({**row, "why": e["not_estimated"]})
            continue
        # The harness loads every model in float32 before a method transforms it (quantizes, wraps): that load
        # is a floor under any method's peak. An address-space limit also counts the process's libraries.
        loaded = sum(p.numel() for p in model.parameters()) * WEIGHT_BYTES
        need = max(e["peak_bytes"], loaded) + (PROCESS_OVERHEAD_BYTES if suite.memory_limit_mb else 0)
        dtype = cfg.train.dtype  # resolved above: float32, bfloat16 or float16
        flops = _flops_per_step(cfg, model, e["trainable_params"], (batches or {}).get(row["cell"])) * cfg.train.steps
        peak = peak_matmul(dtype, device)["peak_matmul_flops"]
        mfu = ASSUMED_MFU.get(device.type, 0.3)
        rows.append(
            {**row, **e, "need": need, "fits": need <= capacity, "seconds": flops / (peak * mfu), "mfu": mfu}
            | {"slow": slow_note(dtype, device)}  # an emulated dtype: its times are at the emulation's speed
        )
    return rows


SAMPLED_BATCHES = 16  # training batches drawn per cell shape to size a step's work


def data_plan(cells: list) -> tuple[list[str], list[str], dict[str, tuple[float, float]]]:
    """What the data will let the suite see, before anything trains: (warnings, notes, batches). A warning per
    model, task and max_seq_len whose inputs would be cut to fit (at least 1% of a split), as the cells will
    tokenize them (a classifier's ids are stored for them): BBC News at 128 tokens cuts every article. A note per
    task with its test examples and the widest 95% interval they give an accuracy (at 0.5), so eval_examples is
    chosen knowing how precise one accuracy will be: ±4.9 points at 400 examples, ±8.6 at 130. Per cell,
    the mean computed tokens and attention pairs of its first training batches, as its TaskIO draws them (padded
    to their longest row, grouped by length where asked): Rotten Tomatoes at max_seq_len 64 computes 26 tokens
    a row, not 64."""
    from harness.cell.models import SHAPES, load_tokenizer, resolve_mode
    from harness.cell.run import task_io
    from harness.driver.runner import cell_key
    from harness.measure.flops import batch_work
    from harness.tasks.builtin import load_task
    from harness.tasks.data import cut_note
    from reports.stats import wilson

    warnings, notes, noted, tokenizers, tasks, ios = [], [], set(), {}, {}, {}
    batches: dict[str, tuple[float, float]] = {}
    sized: dict[tuple, tuple[float, float]] = {}
    for cfg in cells:
        m, t, tr, cell = cfg.model, cfg.task, cfg.train, cell_key(cfg)
        model_name, task_name, _ = cell.split("/", 2)  # as the plan's tables name them
        mode = resolve_mode(m.name, m.mode, m.trust_remote_code) or "classifier"
        spec = t.model_dump_json()
        key = (m.name, mode, spec, tr.max_seq_len)
        try:
            if spec not in tasks:
                tasks[spec] = load_task(t)
            task, n = tasks[spec], len(tasks[spec].test)
            scored = m.init != "random" and m.name not in SHAPES and getattr(task_io(task, mode), "scored", True)
            if scored and n and task_name not in noted:
                noted.add(task_name)
                capped = f" (eval_examples {t.eval_examples}: the split has {n})" if (t.eval_examples or 0) > n else ""
                lo, hi = wilson(0.5, n)
                notes.append(
                    f"{task_name}: {n:,} test examples{capped}: a 95% interval of up to ±{(hi - lo) / 2 * 100:.1f} "
                    "points on an accuracy"
                )
            if key not in ios:
                if (m.name, m.init) not in tokenizers:
                    tokenizers[(m.name, m.init)] = load_tokenizer(m.name, m.trust_remote_code, m.init)
                ios[key] = io = task_io(task, mode)(
                    task, tokenizers[(m.name, m.init)], tr.max_seq_len, t.max_new_tokens
                )
                if note := cut_note(io.input_lengths(), tr.max_seq_len) if hasattr(io, "input_lengths") else None:
                    warnings.append(f"{model_name} · {task_name}: {note}")
            shape = (*key, tr.batch_size, tr.group_by_length, cfg.seed)
            if shape not in sized:
                drawn = ios[key].batches(tr.batch_size, cfg.seed, tr.group_by_length)
                work = [batch_work(next(drawn)["input_ids"]) for _ in range(SAMPLED_BATCHES)]
                sized[shape] = (sum(w[0] for w in work) / len(work), sum(w[1] for w in work) / len(work))
            batches[cell] = sized[shape]
        except Exception as err:  # noqa: BLE001 - a plan line, not a failure: the cell will say it again
            if key not in ios:
                ios[key] = None
                why = (str(err).splitlines() or [""])[0]
                warnings.append(f"{model_name} · {task_name}: inputs not counted: {type(err).__name__}: {why}")
    return warnings, notes, batches


def duration(seconds: float) -> str:
    """An estimated time in the unit a reader takes in at once: ~45 s, ~12 min, ~3.4 h, ~21 days."""
    if seconds < 100:
        return f"~{seconds:.0f} s"
    if seconds < 100 * 60:
        return f"~{seconds / 60:.0f} min"
    if seconds < 48 * 3600:
        return f"~{seconds / 3600:.1f} h"
    return f"~{seconds / 86400:.0f} days"


def print_plan(suite, cells: list) -> int:
    """The plan as a table, then the cells that will not fit by name. Returns 0 (a plan is not a failure)."""
    from rich import box
    from rich.markup import escape
    from rich.table import Table

    from reports.terminal import console

    warnings, notes, batches = data_plan(cells)
    rows = plan_rows(suite, cells, batches)
    out = console()
    out.print(f"ftbench run --dry-run · {escape(suite.name)} · {len(cells)} cells · nothing runs, nothing is written")
    groups: dict[str, list[dict]] = {}
    for r in rows:  # one table per model · task, a row per method/variant/seed
        model, task, rest = r["cell"].split("/", 2)
        groups.setdefault(f"{model} · {task}", []).append({**r, "cell": rest})
    for title, group in groups.items():
        table = Table(title=escape(title), box=box.SIMPLE_HEAD, title_justify="left")
        for i, h in enumerate(("method/variant/seed", "weights", "grads", "optim", "activ", "peak", "needs", "fits")):
            table.add_column(h, justify="left" if i == 0 else "right", no_wrap=True)
        table.add_column("time", justify="right", no_wrap=True)
        why = []  # cells the estimate cannot size, each with its reason under the table (a column would squeeze)
        for r in group:
            if "peak_bytes" not in r:
                table.add_row(escape(r["cell"]), *(["—"] * 6), "?", "—")
                why.append(f"  {escape(r['cell'])}: {escape(r['why'])}")
                continue
            c = r["by_category_bytes"]
            gib = [f"{c[k] / GIB:.2f}" for k in ("weights", "gradients", "optimizer_state", "activations")]
            need = [f"{r['peak_bytes'] / GIB:.2f}", f"{r['need'] / GIB:.2f}", "✓" if r["fits"] else "✗ no"]
            table.add_row(escape(r["cell"]), *gib, *need, duration(r["seconds"]))
        out.print(table)
        for line in why:
            out.print(line, highlight=False)
    capacity, where = (rows[0]["capacity"], rows[0]["where"]) if rows else (0, "")
    out.print(
        f"GiB, estimated (ftbench estimate's model: float32 weights, batch × max_seq_len; under 16-bit autocast "
        f"activ holds the 16-bit copy of each float weight that backward keeps). needs: the peak, or the "
        f"float32 model a method starts from if larger, plus {PROCESS_OVERHEAD_BYTES / GIB:.1f} GiB of libraries "
        f"under an address-space limit; capacity {capacity / GIB:.1f} GiB ({where}). time: training steps only, "
        f"of the task's own batches (padded to their longest row), at an assumed MFU of "
        f"{rows[0].get('mfu', 0.3):.0%} of this machine's measured peak.",
        style="dim",
    )
    for note in sorted({r["slow"] for r in rows if r.get("slow")}):
        out.print(f"[yellow]warning:[/] {escape(note)}: the times above are at that speed")
    for note in notes:
        out.print(escape(note), highlight=False)
    for note in warnings:
        out.print(f"[yellow]warning:[/] {escape(note)}")
    over = [r["cell"] for r in rows if r.get("fits") is False]
    if over:
        out.print(f"will not fit ({len(over)}): {', '.join(over)} — each would end as an oom record")
    else:
        unknown = sum("peak_bytes" not in r for r in rows)
        out.print("every estimated cell fits" + (f" ({unknown} not estimated: above)" if unknown else ""))
    return 0
