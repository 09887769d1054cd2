"""One self-contained HTML page per results set: plotly.js is embedded, nothing is fetched from a network.

Every user-supplied string (suite name, variants, error text, config) is HTML-escaped; figure data travels as
JSON inside ``<script type="application/json">`` with ``<`` escaped, so no string can close a script tag.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import NamedTuple

import plotly.io as pio
from plotly.offline import get_plotlyjs

from harness.records import RunRecord, cell_identity, read_record
from reports import figures
from reports.summary import shown_columns, summary_rows

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1200px;color:#222;
padding:0 16px}
h1{font-size:1.6em;margin-bottom:.2em}h2{margin-top:1.6em;border-bottom:1px solid #ddd;padding-bottom:.2em}
table{border-collapse:collapse;font-size:.85em;width:100%}th,td{border:1px solid #ddd;padding:4px 6px;text-align:left;
vertical-align:top}th{background:#f4f4f4;cursor:pointer;user-select:none}th:hover{background:#e8e8e8}
tr:nth-child(even) td{background:#fafafa}.fail td{background:#fff0f0}pre{background:#f6f8fa;padding:10px;
overflow:auto;font-size:.8em;max-height:420px}.note{color:#555;font-size:.9em}.plot{min-height:420px}
.warn{background:#fff8e1;border-left:4px solid #f0b400;padding:6px 10px}
"""

SORT_JS = """
document.querySelectorAll('table.sortable th').forEach(function(th, col){
  th.addEventListener('click', function(){
    var tbody = th.closest('table').tBodies[0];
    var rows = Array.prototype.slice.call(tbody.rows);
    var asc = th.dataset.dir !== 'asc'; th.dataset.dir = asc ? 'asc' : 'desc';
    rows.sort(function(a, b){
      var x = a.cells[col].dataset.v, y = b.cells[col].dataset.v;
      var nx = parseFloat(x), ny = parseFloat(y);
      var r = (!isNaN(nx) && !isNaN(ny)) ? nx - ny : String(x).localeCompare(String(y));
      return asc ? r : -r;
    });
    rows.forEach(function(r){ tbody.appendChild(r); });
  });
});
document.querySelectorAll('script.fig').forEach(function(s){
  var fig = JSON.parse(s.textContent);
  Plotly.newPlot(s.dataset.target, fig.data, fig.layout, {responsive: true, displaylogo: false});
});
"""


def _sort_value(r: RunRecord, col: str, text: str) -> str:
    """Raw numbers behind formatted cells, so columns sort numerically."""
    peak = figures.peak_bytes(r)[0]
    raw = {
        "trainable": r.trainable_params,
        "trainable %": r.trainable_pct,
        "weights": r.weight_bytes,
        "peak memory": peak,
        "tokens/s": r.tokens_per_s,
        "MFU": r.mfu,
        "export": r.export_bytes,
        "step time (median)": r.step_time_stats.get("median_s"),
        "accuracy before → after": r.eval_after.accuracy if r.eval_after else None,
        "forgetting: LM loss before → after": (r.forgetting or {}).get("after", {}).get("lm_loss"),
    }
    v = raw.get(col, text)
    return "" if v is None else str(v)


def _table(records: list[RunRecord]) -> str:
    """The summary table; columns equal in every row (model, task, seed) are stated once above it."""
    rows = summary_rows(records)
    constant = [c for c in ("model", "task", "seed") if rows and len({r[c] for r in rows}) == 1]
    cols = [c for c in shown_columns(rows) if c not in constant]
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = []
    for r, row in zip(records, rows, strict=True):
        cls = "" if r.status == "ok" else ' class="fail"'
        cells = "".join(
            f'<td data-v="{html.escape(_sort_value(r, c, row[c]))}">{html.escape(row[c])}</td>' for c in cols
        )
        body.append(f"<tr{cls}>{cells}</tr>")
    same = " · ".join(f"{c}: <b>{html.escape(rows[0][c])}</b>" for c in constant)
    return (f"<p>{same}</p>" if same else "") + (
        f'<table class="sortable"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'
    )


def _figure(fig, fid: str) -> str:
    data = pio.to_json(fig, validate=False).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    return (
        f'<div id="{fid}" class="plot"></div>'
        f'<script type="application/json" class="fig" data-target="{fid}">{data}</script>'
    )


def _failures(records: list[RunRecord]) -> str:
    bad = [r for r in records if r.status != "ok"]
    if not bad:
        return "<p>Every run finished with status <b>ok</b>.</p>"
    parts = []
    for r in bad:
        parts.append(
            f"<h3>{html.escape(r.status)}: {html.escape(f'{r.method}/{r.variant}')} · "
            f"{html.escape(r.model)} · {html.escape(r.task)} · seed {r.seed}</h3>"
            f"<pre>{html.escape(r.error or '(no error text)')}</pre>"
        )
    return "".join(parts)


def _hardware(records: list[RunRecord]) -> str:
    """The machine(s) the runs come from, at the top: step times and MFU mean nothing without it."""
    from reports.compare import hardware_of

    machines = sorted({hardware_of(r) for r in records})
    if len(machines) == 1:
        from harness.hardware import describe

        env = records[0].environment  # with the measured bf16 speed where the record has it
        line = describe(env) if "bf16_speedup_vs_fp32" in env else machines[0]
        return f'<p class="note">Hardware: <b>{html.escape(line)}</b></p>'
    items = "".join(f"<li>{html.escape(m)}</li>" for m in machines)
    return (
        f'<p class="warn">These runs come from {len(machines)} different machines; step time, tokens/s and MFU '
        f"do not compare across them:</p><ul>{items}</ul>"
    )


def _environment(records: list[RunRecord]) -> str:
    envs = {
        json.dumps({k: v for k, v in r.environment.items() if k not in ("hostname",)}, sort_keys=True) for r in records
    }
    warn = ""
    if len(envs) > 1:
        warn = f'<p class="warn">Runs in this set come from {len(envs)} different environments; compare with care.</p>'
    env = records[0].environment if records else {}
    return warn + f"<pre>{html.escape(json.dumps(env, indent=1, sort_keys=True))}</pre>"


class Results(NamedTuple):
    records: list[RunRecord]
    suite_text: str
    name: str
    problems: list[str]  # unreadable or stale records, each named: shown, never silently mixed in


def load_results(results_dir: Path) -> Results:
    """Records of a results dir (in the suite's cell order when known), the suite text, the suite name, and
    what was left out: records that cannot be read (named), and records of a cell's other configs (stale)."""
    results_dir = Path(results_dir)
    paths = sorted((results_dir / "records").glob("*.json"))
    problems: list[str] = []
    order = None
    try:
        order = {cid: i for i, cid in enumerate(json.loads((results_dir / "cells_index.json").read_text()))}
    except FileNotFoundError:
        pass
    except (OSError, ValueError, TypeError) as err:
        problems.append(f"{results_dir / 'cells_index.json'} is unreadable ({type(err).__name__}); cell order unknown")
    records = []
    for p in paths:
        try:
            records.append(read_record(p))
        except (OSError, ValueError) as err:
            problems.append(f"unreadable record {p}: {str(err).splitlines()[0][:200]}")
    records, stale = current_records(records, order)
    if stale:
        problems.append(
            f"{len(stale)} record(s) of an earlier config of a cell (or of a cell this suite no longer has) left "
            f"out: {', '.join(sorted(r.cell_id for r in stale)[:5])}{' …' if len(stale) > 5 else ''}"
        )
    if order is not None:
        records.sort(key=lambda r: order.get(r.cell_id, len(order)))
    suite_path = results_dir / "suite.yaml"
    suite_text = suite_path.read_text(errors="replace") if suite_path.exists() else ""
    name = records[0].suite if records else results_dir.name
    return Results(records, suite_text, name, problems)


def current_records(records: list[RunRecord], index: dict | None) -> tuple[list[RunRecord], list[RunRecord]]:
    """(kept, stale): with the suite's cell index, the records of its cells; and of several records of one cell
    identity (a config changed between runs), only the newest. One cell never shows two configs."""
    kept, stale = [], []
    for r in records:
        (kept if index is None or r.cell_id in index else stale).append(r)
    newest: dict[str, RunRecord] = {}
    for r in kept:
        key = cell_identity(r.cell_id)
        if key in newest:
            older, newer = sorted((newest[key], r), key=lambda x: x.started_at)
            stale.append(older)
            newest[key] = newer
        else:
            newest[key] = r
    return list(newest.values()), stale


def render(records: list[RunRecord], suite_text: str, suite_name: str, problems: list[str] | None = None) -> str:
    figs = [
        ("pareto", figures.pareto(records)),
        ("memory", figures.memory_breakdown(records)),
        ("throughput", figures.throughput(records)),
        ("loss", figures.loss_curves(records)),
    ]
    spread, notes = figures.seed_spread(records)
    figs.append(("seeds", spread))
    plots = {fid: _figure(fig, f"fig-{fid}") for fid, fig in figs}
    name = html.escape(suite_name)
    n_ok = sum(r.status == "ok" for r in records)
    sections = [
        f"<h1>ftbench · {name}</h1>",
        f'<p class="note">{len(records)} runs, {n_ok} ok. Memory figures say what they measure: CPU figures are '
        "live tensor bytes, never VRAM. Click a column header to sort.</p>",
        _hardware(records) if records else "",
        "".join(f'<p class="warn">{html.escape(p)}</p>' for p in problems or []),
        "<h2>Summary</h2>",
        _table(records),
        "<h2>Memory vs accuracy</h2>",
        plots["pareto"],
        "<h2>Memory breakdown</h2>",
        plots["memory"],
        '<p class="note">Categories: parameters (trainable, frozen, quantized storage incl. constants), gradients, '
        "optimizer state, activations saved for backward, and temporaries — each tensor counted once, settled at "
        "the end of the step (see harness/memory.py).</p>",
        "<h2>Throughput</h2>",
        plots["throughput"],
        "<h2>Loss curves</h2>",
        plots["loss"],
        "<h2>Accuracy across seeds</h2>",
        plots["seeds"],
        "".join(f"<p>{html.escape(n)}</p>" for n in notes),
        "<h2>Failed, out-of-memory and timed-out runs</h2>",
        _failures(records),
        "<h2>Environment</h2>",
        _environment(records),
        "<h2>Suite configuration</h2>",
        f"<pre>{html.escape(suite_text or '(suite.yaml not found)')}</pre>",
    ]
    return (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>ftbench · {name}</title>'
        f"<style>{CSS}</style><script>{get_plotlyjs()}</script></head><body>{''.join(sections)}"
        f"<script>{SORT_JS}</script></body></html>"
    )


def write_report(results_dir: Path, out: Path | None = None) -> Path:
    res = load_results(results_dir)
    out = Path(out) if out else Path(results_dir) / "report.html"
    from harness.atomic import atomic_write_text

    atomic_write_text(out, render(res.records, res.suite_text, res.name, res.problems))
    return out
