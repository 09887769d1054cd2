"""One self-contained HTML page per results set: plotly.js is embedded (or, on request, referenced from its
CDN), nothing else is fetched from a network.

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

from harness.records import RunRecord, read_current
from reports import deployment, explore, figures, headline, labels, league, samples, scale, tuning
from reports.caveats import training_warnings
from reports.metrics import BY_COLUMN
from reports.summary import MEANINGS, NUMERIC, shown_columns, summary_rows

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1200px;color:#222;
padding:0 16px}
h1{font-size:1.6em;margin-bottom:.2em}h2{margin-top:1.6em;border-bottom:1px solid #ddd;padding-bottom:.2em}
table{border-collapse:collapse;font-size:.85em;width:100%}th,td{border:1px solid #ddd;padding:4px 6px;text-align:left;
vertical-align:top}th{background:#f4f4f4;cursor:pointer;user-select:none}th:hover{background:#e8e8e8}
tr:nth-child(even) td{background:#fafafa}.fail td{background:#fff0f0}pre{background:#f6f8fa;padding:10px;
overflow:auto;font-size:.8em;max-height:420px}.note{color:#555;font-size:.9em}.plot{min-height:420px}
.warn{background:#fff8e1;border-left:4px solid #f0b400;padding:6px 10px}
.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
.numw{text-align:right;font-variant-numeric:tabular-nums}.scroll{overflow-x:auto;max-width:100%}
.sig{color:#0a6b2f;font-weight:600}.nosig{color:#8a5a00}ul.best li{margin:.2em 0}
@media (max-width:600px){body{margin:8px auto;padding:0 8px}table{font-size:.75em}.plot{min-height:320px}}
@media print{body{max-width:none;margin:0}.plot,.js-plotly-plot,tr,pre,ul.best{break-inside:avoid;
page-break-inside:avoid}h2,h3{break-after:avoid}.plot{width:100%!important}pre{max-height:none;white-space:pre-wrap}
th{cursor:auto}.scroll{overflow:visible}table{font-size:6.5pt;word-break:break-word}th,td{padding:2px 3px}
.num{white-space:normal}}
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
// Printed, a plot keeps the width it was drawn at: give every plot a width that fits an A4 or Letter page
// (default margins) before printing, and its own width back after.
var PRINT_WIDTH = 680;
function eachPlot(update){
  document.querySelectorAll('.js-plotly-plot').forEach(function(el){ Plotly.relayout(el, update); });
}
window.addEventListener('beforeprint', function(){ eachPlot({width: PRINT_WIDTH, autosize: false}); });
window.addEventListener('afterprint', function(){ eachPlot({width: null, autosize: true}); });
document.querySelectorAll('script.fig').forEach(function(s){
  var fig = JSON.parse(s.textContent);
  Plotly.newPlot(s.dataset.target, fig.data, fig.layout, {responsive: true, displaylogo: false});
});
"""


def _sort_value(r: RunRecord, col: str, text: str) -> str:
    """Raw numbers behind formatted cells, so columns sort numerically."""
    v = BY_COLUMN[col].get(r) if col in BY_COLUMN else text  # the catalogue's raw value (reports/metrics.py)
    return "" if v is None else str(v)


def _table(records: list[RunRecord]) -> str:
    """The summary table; columns equal in every row (model, task, seed) are stated once above it."""
    rows = summary_rows(records)
    constant = [c for c in ("model", "task", "seed") if rows and len({r[c] for r in rows}) == 1]
    cols = [c for c in shown_columns(rows) if c not in constant]
    head = "".join(f'<th title="{html.escape(MEANINGS.get(c, c))}">{html.escape(c)}</th>' for c in cols)
    body = []
    for r, row in zip(records, rows, strict=True):
        cls = "" if r.status == "ok" else ' class="fail"'
        cells = "".join(
            f'<td{" class=num" if c in NUMERIC else ""} data-v="{html.escape(_sort_value(r, c, row[c]))}">'
            f"{html.escape(row[c])}</td>"
            for c in cols
        )
        body.append(f"<tr{cls}>{cells}</tr>")
    same = " · ".join(f"{c}: <b>{html.escape(rows[0][c])}</b>" for c in constant)
    foot = "".join(f"<li><b>{html.escape(c)}</b>: {html.escape(MEANINGS[c])}</li>" for c in cols if c in MEANINGS)
    return (f"<p>{same}</p>" if same else "") + (
        f'<div class="scroll"><table class="sortable"><thead><tr>{head}</tr></thead>'
        f'<tbody>{"".join(body)}</tbody></table></div><ul class="note">{foot}</ul>'
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
    from reports.stats import hardware_of

    machines = sorted({hardware_of(r) for r in records})
    if len(machines) == 1:
        from harness.environment import describe

        env = records[0].environment  # with the measured bf16 speed where the record has it
        line = describe(env) if "bf16_speedup_vs_fp32" in env else machines[0]
        return f'<p class="note">Hardware: <b>{html.escape(line)}</b></p>' + _provenance(records)
    items = "".join(f"<li>{html.escape(m)}</li>" for m in machines)
    return (
        f'<p class="warn">These runs come from {len(machines)} different machines; step time, tokens/s and MFU '
        f"do not compare across them:</p><ul>{items}</ul>"
    )


LIBRARIES = ("torch", "transformers", "peft", "bitsandbytes")


def _provenance(records: list[RunRecord]) -> str:
    """The code and libraries behind the numbers; a dirty tree is a visible warning (its code is not a commit)."""
    envs = [r.environment for r in records]
    commits = sorted({str(e.get("git_commit"))[:10] for e in envs})
    libs = " · ".join(
        f"{lib} {'/'.join(sorted({str((e.get('versions') or {}).get(lib)) for e in envs}))}" for lib in LIBRARIES
    )
    out = f'<p class="note">Commit {html.escape(", ".join(commits))} · {html.escape(libs)}</p>'
    dirty = sum(bool(e.get("git_dirty")) for e in envs)
    if dirty:
        out += (
            f'<p class="warn">{dirty} of {len(envs)} runs ran from a working tree with uncommitted changes: the '
            "commit named above is not the code that produced them.</p>"
        )
    if len(commits) > 1:
        out += f'<p class="warn">These runs come from {len(commits)} different commits.</p>'
    return out


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
    """A results dir as the reports read it: current records, suite text and name, what was left out."""

    records: list[RunRecord]
    suite_text: str
    name: str
    problems: list[str]  # unreadable or stale records, each named: shown, never silently mixed in


def load_results(results_dir: Path) -> Results:
    """Records of a results dir (in the suite's cell order when known), the suite text, the suite name, and
    what was left out: records that cannot be read (named), and records of a cell's other configs (stale)."""
    results_dir = Path(results_dir)
    records, problems = read_current(results_dir)
    suite_path = results_dir / "suite.yaml"
    suite_text = suite_path.read_text(errors="replace") if suite_path.exists() else ""
    name = records[0].suite if records else results_dir.name
    return Results(records, suite_text, name, problems)


def render(
    records: list[RunRecord],
    suite_text: str,
    suite_name: str,
    problems: list[str] | None = None,
    plotly: str = "embed",
    results_dir: Path | None = None,
) -> str:
    """The whole report page, self-contained: every section, plotly embedded (or from its CDN)."""
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
        "<h2>Headline: each configuration over its seeds</h2>",
        headline.render(records),
        "".join(f'<p class="warn">{html.escape(w)}</p>' for w in training_warnings(records)),
        "<h2>Hyperparameters: tuned on the validation split, or hand-set</h2>",
        tuning.render(records, results_dir, _figure),
        "<h2>Every run</h2>",
        _table(records),
        *(["<h2>Each label's recall</h2>", labels.render(records)] if labels.applies(records) else []),
        *(["<h2>Generated answers</h2>", samples.render(records)] if samples.applies(records) else []),
        "<h2>Deployment cost of each artifact</h2>",
        deployment.render(records, _figure),
        *(
            ["<h2>Quantized-merge league: each quantized artifact as served</h2>", league.render(records)]
            if league.applies(records)
            else []
        ),
        "<h2>Memory vs accuracy</h2>",
        plots["pareto"],
        "<h2>Any two metrics</h2>",
        explore.render(records),
        *(
            ["<h2>Memory at scale: measured against the estimate</h2>", scale.render(records, _figure)]
            if scale.applies(records)
            else []
        ),
        "<h2>Memory breakdown</h2>",
        plots["memory"],
        '<p class="note">Categories: parameters (trainable, frozen, quantized storage incl. constants), gradients, '
        "optimizer state, activations saved for backward, and temporaries — each tensor counted once, settled at "
        "the end of the step (see harness/measure/memory.py).</p>",
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
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f'<meta name="viewport" content="width=device-width, initial-scale=1"><title>ftbench · {name}</title>'
        f"<style>{CSS}</style>{plotly_script(plotly)}</head><body>{''.join(sections)}"
        f"<script>{SORT_JS}{explore.JS}</script></body></html>"
    )


def plotly_script(how: str = "embed") -> str:
    """plotly.js inside the page (default: opens offline, ~4.8 MB), or a reference to its CDN (small file,
    needs the network to draw the figures)."""
    if how == "cdn":
        from plotly.offline import get_plotlyjs_version

        return f'<script src="https://cdn.plot.ly/plotly-{get_plotlyjs_version()}.min.js" charset="utf-8"></script>'
    if how != "embed":
        raise ValueError(f"plotly must be 'embed' or 'cdn', got {how!r}")
    return f"<script>{get_plotlyjs()}</script>"


def write_report(results_dir: Path, out: Path | None = None, plotly: str = "embed") -> Path:
    """Write the self-contained HTML report; return its path."""
    res = load_results(results_dir)
    out = Path(out) if out else Path(results_dir) / "report.html"
    from harness.atomic import atomic_write_text

    atomic_write_text(out, render(res.records, res.suite_text, res.name, res.problems, plotly, Path(results_dir)))
    return out
