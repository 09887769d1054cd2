"""A scatter of any two metrics, chosen in the page (like PEFT's method-comparison app): one point per ok run,
one colour per (model, task), the run's config on hover. The data travels as JSON with ``<`` escaped."""

from __future__ import annotations

import html
import json

from harness.records import RunRecord
from reports.figures import SERIES_COLORS
from reports.metrics import CATALOGUE, shown, shown_label

# key: (label with its unit, value of a record or None)
# the catalogue's metrics the page offers, in the units it shows them (reports/metrics.py)
OFFERED = [m for m in CATALOGUE if m.key not in ("macro_f1_after", "forgetting_lm_loss_after")]
METRICS = {m.key: (shown_label(m), lambda r, m=m: shown(m, r)) for m in OFFERED}


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
        f"<p>{select('X', 'step_time_median_s')} &nbsp; {select('Y', 'accuracy_after')}</p>"
        '<div id="fig-explore" class="plot"></div>'
        f'<script type="application/json" id="explore-data">{payload}</script>'
    )
