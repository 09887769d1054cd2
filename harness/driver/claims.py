"""``ftbench claims``: run the claims suite (resuming), take the measurement claims' figures, and write the
verdict table (``RESULTS/claims.html`` and ``claims.md``). The verdicts themselves are in reports/claims.py."""

from __future__ import annotations

import json
import time
from pathlib import Path

from harness.atomic import atomic_write_text


def run_claims(suite_path: str, results: Path, run: bool = True, say=print) -> tuple[Path, str]:
    """Returns (claims.html, the markdown table)."""
    from harness.driver.runner import run_suite
    from harness.driver.suite import expand, load_suite
    from harness.environment import describe, git
    from harness.measure.hardware import default_device, identity
    from harness.records import read_current
    from harness.schema import ConfigError
    from reports.claim_sets import select
    from reports.claims import measurement_claims, render_html, to_markdown

    t0 = time.perf_counter()
    suite = load_suite(suite_path)
    try:  # every claim's entries are there: a renamed variant is an error now, not an empty row later
        sets = select({f"{m.method}/{m.variant}" for m in suite.methods})
    except ValueError as err:
        raise ConfigError(f"{suite_path}: {err}") from None
    if run:
        run_suite(suite, Path(suite_path).read_text(), results)
    cells = {c.cell_id for c in expand(suite)}
    current, problems = read_current(results)  # an unreadable record is named, not a crash
    for p in problems:
        say(f"warning: {p}")
    # a tuned suite's final cells carry the chosen hyperparameters, so their ids are not the suite's as written
    records = [r for r in current if r.cell_id in cells or (r.config or {}).get("tuning")]
    verdicts = [v for s in sets for v in s.verdicts(records)]
    if any(s.measurements for s in sets):
        cache = results / "claims_measurements.json"
        if cache.exists():
            meas = json.loads(cache.read_text())
        else:
            say("measuring quantization error per layer (NF4, FP4, INT4) and double quantization's bits")
            from harness.measure.quanterror import measure

            meas = measure()
            atomic_write_text(cache, json.dumps(meas))
        verdicts += measurement_claims(meas)
    hw = describe(identity(default_device()))
    when = time.strftime("%Y-%m-%d", time.gmtime())
    notes = [
        f"{suite.name}: {len(records)} of {len(cells)} runs recorded in {results}; measured on {hw}; "
        f"commit {(git('rev-parse', '--short', 'HEAD') or '?')}; page written {when}.",
        "Each accuracy difference is paired on the same test examples, its 95% interval a bootstrap over test "
        "examples and seeds; '≈' means inside ±1 accuracy point (the margin the papers call parity). A claim "
        f"that does not reproduce at this scale ({', '.join(m.name for m in suite.models)}, {suite.train.steps} "
        "steps, one task) says so; it says nothing about the papers' own models.",
    ]
    title = "ftbench · claims" + ("" if suite.name == "claims" else f" · {suite.name}")
    page = render_html(verdicts, title, notes)
    out = results / "claims.html"
    atomic_write_text(out, page)
    md = to_markdown(verdicts)
    atomic_write_text(results / "claims.md", f"{notes[0]}\n\n{md}\n")
    say(
        f"claims: {sum(v.verdict == 'reproduced' for v in verdicts)} of {len(verdicts)} reproduced "
        f"({time.perf_counter() - t0:.0f} s here)"
    )
    return out, md
