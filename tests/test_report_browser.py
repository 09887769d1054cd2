"""The HTML report in a real browser (Debian's Chromium driven by Playwright): plots render, nothing errors,
user strings stay text, and the page needs no network."""

import json
import os
import shutil

import pytest

from harness.cell import run_cell
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


def test_report_renders_offline_with_no_errors(report):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--no-first-run",
            ],
        )
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
    assert len(plots) == 5 and all(plots)
    assert EVIL in title and EVIL in h1  # shown as text, never run
    assert 'Boom <img src=x onerror="alert(2)"> & more' in failures and "<b>bold</b>" in failures
    assert sorted(sort_before) == sorted(sort_after) and sort_after == sorted(sort_after)


def test_report_files_are_self_contained_json_safe(report):
    html = report.read_text()
    assert html.count("<script>alert(1)</script>") == 0  # every occurrence is escaped
    figs = [chunk.split("</script>")[0] for chunk in html.split('class="fig"')[1:]]
    for f in figs:
        json.loads(f.split(">", 1)[1])
