"""A scatter of any two metrics, chosen in the page (like PEFT's method-comparison app): one point per ok run,
one colour per (model, task), the run's config on hover. The data travels as JSON with ``<`` escaped."""

from __future__ import annotations

import html
import json

from harness.records import RunRecord
from reports.figures import SERIES_COLORS, peak_bytes

MIB = 2**20
# key: (label with its unit, value of a record or None)
METRICS = {
    "accuracy": ("test accuracy after training", lambda r: r.eval_after.accuracy if r.eval_after else None),
    "accuracy_before": ("test accuracy before training", lambda r: r.eval_before.accuracy if r.eval_before else None),
    "peak_mib": ("peak memory, MiB (as the run measured it)", lambda r: _div(peak_bytes(r)[0], MIB)),
    "peak_rss_mib": ("peak RSS of the cell process, MiB", lambda r: _div(r.peak_rss_bytes, MIB)),
    "step_ms": ("median step time, ms", lambda r: _div(r.step_time_stats.get("median_s"), 1e-3)),
    "tokens_per_s": ("training tokens per second", lambda r: r.tokens_per_s),
    "trainable_params": ("trainable parameters", lambda r: r.trainable_params),
    "trainable_pct": ("trainable parameters, % of all", lambda r: r.trainable_pct),
    "weight_mib": ("weight storage, MiB", lambda r: _div(r.weight_bytes, MIB)),
    "export_mib": ("all exports on disk, MiB", lambda r: _div(r.export_bytes, MIB)),
    "mfu_pct": ("MFU, % of the measured matmul peak", lambda r: _div(r.mfu, 0.01)),
    "final_loss": ("final training loss", lambda r: r.final_loss),
    "wall_s": ("wall time of the run, s", lambda r: r.wall_time_s),
}


def _div(v: float | None, by: float) -> float | None:
    return None if v is None else v / by


def _hover(r: RunRecord) -> str:
    t = r.config.get("train", {})
    method_cfg = json.dumps(r.config.get("method_config", {}), sort_keys=True)
    return (
        f"{r.method}/{r.variant} · seed {r.seed}<br>{r.model} · {r.task}<br>lr {t.get('lr')} · steps {t.get('steps')}"
        f" · batch {t.get('batch_size')} · {t.get('dtype')}<br>{method_cfg[:200]}"
    )


def data(records: list[RunRecord]) -> dict:
    """The runs' metrics as the page's JSON, for its two-metric scatter."""
    ok = [r for r in records if r.status == "ok"]
    series = sorted({f"{r.model} · {r.task}" for r in ok})
    rows = []
    for r in ok:
        row = {k: f(r) for k, (_, f) in METRICS.items()}
        row.update(series=f"{r.model} · {r.task}", name=f"{r.method}/{r.variant} s{r.seed}", hover=_hover(r))
        rows.append(row)
    colours = {s: SERIES_COLORS[i % len(SERIES_COLORS)] for i, s in enumerate(series)}
    return {"rows": rows, "labels": {k: v[0] for k, v in METRICS.items()}, "colours": colours}


JS = """
(function(){
  var d = JSON.parse(document.getElementById('explore-data').textContent);
  var sx = document.getElementById('explore-x'), sy = document.getElementById('explore-y');
  function esc(s){ var e = document.createElement('span'); e.textContent = s; return e.innerHTML; }
  function draw(){
    var x = sx.value, y = sy.value, traces = {};
    d.rows.forEach(function(r){
      if (r[x] === null || r[y] === null) return;
      var t = traces[r.series] || (traces[r.series] = {x: [], y: [], text: [], hovertext: [], name: esc(r.series),
        mode: 'markers+text', type: 'scatter', textposition: 'top center', hoverinfo: 'text+x+y',
        marker: {size: 10, color: d.colours[r.series]}});
      t.x.push(r[x]); t.y.push(r[y]); t.text.push(esc(r.name));
      t.hovertext.push(esc(r.hover).replace(/&lt;br&gt;/g, '<br>'));
    });
    Plotly.react('fig-explore', Object.values(traces), {
      title: esc(d.labels[y] + ' vs ' + d.labels[x]), xaxis: {title: {text: esc(d.labels[x])}},
      yaxis: {title: {text: esc(d.labels[y])}}, height: 440, margin: {l: 60, r: 20, t: 50, b: 60},
      legend: {orientation: 'h', y: -0.2}
    }, {responsive: true, displaylogo: false});
  }
  sx.addEventListener('change', draw); sy.addEventListener('change', draw); draw();
})();
"""


def render(records: list[RunRecord]) -> str:
    """The report's "Any two metrics" section as HTML: the runs' data and the picker."""
    payload = json.dumps(data(records)).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")

    def select(which: str, chosen: str) -> str:
        opts = "".join(
            f'<option value="{k}"{" selected" if k == chosen else ""}>{html.escape(label)}</option>'
            for k, (label, _) in METRICS.items()
        )
        return f'<label>{which} <select id="explore-{which.lower()}">{opts}</select></label>'

    return (
        f"<p>{select('X', 'step_ms')} &nbsp; {select('Y', 'accuracy')}</p>"
        '<div id="fig-explore" class="plot"></div>'
        f'<script type="application/json" id="explore-data">{payload}</script>'
    )
