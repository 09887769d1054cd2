"""The HTML report in a real browser (Debian's Chromium driven by Playwright): plots render, nothing errors,
user strings stay text, and the page needs no network."""

import json
import os
import shutil

import pytest

from harness.cell.run import run_cell
from harness.records import read_record, write_record
from reports.html import write_report
from tests.conftest import cells

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
EVIL = "<script>alert(1)</script>"

if not CHROMIUM:
    if os.environ.get("FTBENCH_REQUIRE_BROWSER") == "1":
        pytest.fail("chromium is not installed but FTBENCH_REQUIRE_BROWSER=1 (apt-get install chromium)", pytrace=False)
    pytest.skip("chromium not installed (make browser)", allow_module_level=True)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """A results dir with two real tiny runs and a failed one, all under a hostile suite name."""
    d = tmp_path_factory.mktemp("results")
    for cfg in cells(methods=[{"method": "lora"}, {"method": "full"}]):
        run_cell(cfg.model_copy(update={"export": False}), d)
    for p in (d / "records").glob("*.json"):
        rec = read_record(p)
        write_record(d, rec.model_copy(update={"suite": EVIL}))
    failed = rec.model_copy(
        update={
            "cell_id": "failed-cell",
            "status": "failed",
            "variant": "<b>bold</b>",
            "error": 'Boom <img src=x onerror="alert(2)"> & more',
            "suite": EVIL,
        }
    )
    write_record(d, failed)
    (d / "suite.yaml").write_text(f"name: {EVIL}\n")
    return write_report(d)


ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]


def test_report_renders_offline_with_no_errors(report):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        context = browser.new_context(offline=True)  # the page must load with the network off
        page = context.new_page()
        errors, dialogs, requests = [], [], []
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
        page.on("request", lambda r: requests.append(r.url) if not r.url.startswith(("file:", "data:")) else None)
        page.goto(report.as_uri())
        page.wait_for_timeout(500)
        plots = page.eval_on_selector_all(".plot", "els => els.map(e => !!e.querySelector('svg.main-svg'))")
        title = page.title()
        h1 = page.inner_text("h1")
        failures = page.inner_text("body")
        sort_before = page.eval_on_selector_all("table.sortable tbody tr", "rs => rs.map(r => r.cells[0].innerText)")
        page.click("table.sortable th:nth-child(1)")
        sort_after = page.eval_on_selector_all("table.sortable tbody tr", "rs => rs.map(r => r.cells[0].innerText)")
        browser.close()
    assert errors == [] and dialogs == [] and requests == []
    assert len(plots) == 6 and all(plots)  # five figures and the two-metric explorer
    assert EVIL in title and EVIL in h1  # shown as text, never run
    assert 'Boom <img src=x onerror="alert(2)"> & more' in failures and "<b>bold</b>" in failures
    assert sorted(sort_before) == sorted(sort_after) and sort_after == sorted(sort_after)


def test_report_files_are_self_contained_json_safe(report):
    html = report.read_text()
    assert html.count("<script>alert(1)</script>") == 0  # every occurrence is escaped
    figs = [chunk.split("</script>")[0] for chunk in html.split('class="fig"')[1:]]
    for f in figs:
        json.loads(f.split(">", 1)[1])


@pytest.fixture(scope="module")
def grid_report(tmp_path_factory, report):
    """2 models × 2 tasks × 2 seeds × 2 methods, made from the real tiny runs (model, task, seed relabelled;
    accuracies shifted per task and seed, the per-example answers kept consistent with them)."""
    d = tmp_path_factory.mktemp("grid")
    base = [r for r in map(read_record, sorted((report.parent / "records").glob("*.json"))) if r.status == "ok"]
    for model in ("tiny-bert", "other-model"):
        for task in ("rotten_tomatoes", "bbc_news"):
            for seed in (0, 1):
                for r in base:
                    n = r.eval_after.examples
                    k = min(n, round(r.eval_after.accuracy * n) + 2 * seed + (n // 3 if task == "bbc_news" else 0))
                    after = r.eval_after.model_copy(update={"accuracy": k / n, "correct": "1" * k + "0" * (n - k)})
                    cid = f"{model}__{task}__{r.method}-{r.variant}__s{seed}__x"
                    rec = r.model_copy(
                        update={"cell_id": cid, "model": model, "task": task, "seed": seed, "eval_after": after}
                    )
                    write_record(d, rec.model_copy(update={"suite": "grid"}))
    return write_report(d)


def test_grid_report_per_model_and_task_on_a_phone_and_in_print(grid_report, tmp_path):
    """Bars, seeds and verdicts are per (model, task); the frontier line has a visible stroke; 390 px wide
    has no horizontal page scroll; printed, no plot is wider than the page."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_context(offline=True, viewport={"width": 1440, "height": 900}).new_page()
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(grid_report.as_uri())
        page.wait_for_timeout(500)
        sections = page.eval_on_selector_all("h3", "hs => hs.map(h => h.innerText)")
        bars = page.eval_on_selector_all("#fig-throughput .bars .point", "ps => ps.length")
        seeds = page.eval_on_selector_all("#fig-seeds .xtick", "ts => ts.map(t => t.textContent)")
        strokes = page.eval_on_selector_all(
            "#fig-pareto .scatterlayer .trace path.js-line", "ps => ps.map(p => getComputedStyle(p).stroke)"
        )
        body = page.inner_text("body")
        # the headline's tables, each [scrollWidth, clientWidth], and where its verdict column starts
        headline = page.evaluate(
            """() => { const out = []; let h = [...document.querySelectorAll('h2')]
                   .find(x => x.innerText.startsWith('Headline')).nextElementSibling;
               for (; h && h.tagName !== 'H2'; h = h.nextElementSibling)
                 if (h.classList.contains('scroll')) out.push([h.scrollWidth, h.clientWidth,
                   [...h.querySelectorAll('th')].map(t => t.innerText).indexOf('vs the most accurate')]);
               return out; }"""
        )
        page.set_viewport_size({"width": 390, "height": 800})
        page.wait_for_timeout(300)
        phone = page.evaluate("[document.documentElement.scrollWidth, document.documentElement.clientWidth]")
        page.emulate_media(media="print")
        page.set_viewport_size({"width": 1440, "height": 900})  # printed from a wide window
        page.wait_for_timeout(300)
        page.evaluate("window.dispatchEvent(new Event('beforeprint'))")  # what the browser's print does
        page.wait_for_timeout(300)
        # A4 at 96 px/inch is 794 px wide; Chromium's default print margins leave about 718 px of it
        printed = page.eval_on_selector_all(".js-plotly-plot svg.main-svg", "ss => ss.map(s => s.width.baseVal.value)")
        pdf = tmp_path / "report.pdf"
        page.pdf(path=str(pdf), format="A4")
        browser.close()
    assert errors == []
    assert sorted(s.split(" (")[0] for s in sections if " test examples" in s) == sorted(  # the headline's
        f"{m} · {t}" for m in ("tiny-bert", "other-model") for t in ("rotten_tomatoes", "bbc_news")
    )
    assert bars == 16  # one bar per run, none stacked onto another (model, task)'s
    assert len(seeds) == 8 and len(set(seeds)) == 8 and all(" · " in s for s in seeds)
    assert body.count("within noise") + body.count("beyond noise") >= 4
    assert strokes and all(s not in ("none", "rgba(0, 0, 0, 0)") for s in strokes)
    assert phone[0] <= phone[1], f"horizontal page scroll at 390 px: {phone}"
    # on a laptop the headline fits its 1200 px column, its verdict beside the accuracy: no scrolling to read it
    assert len(headline) == 4 and all(w <= cw and col == 3 for w, cw, col in headline), headline
    assert pdf.stat().st_size > 10_000
    if os.environ.get("FTBENCH_KEEP_PDF"):
        shutil.copy(pdf, os.environ["FTBENCH_KEEP_PDF"])
    assert printed and max(printed) <= 718, printed
