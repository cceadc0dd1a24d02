"""The run summary as a person reads it, in a real browser: a real run's data (data/summary.json,
a run with a seeded bug's failures and fault scenarios, made by make_fixture.py) re-rendered by
the current code, opened in chromium at 1366 px. A screenshot of the first screen goes into
this run's folder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from playwright.sync_api import Page

from harness.report import render

DATA = Path(__file__).with_name("data") / "summary.json"


@pytest.fixture(scope="module")
def summary_html(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("run")
    shutil.copy(DATA, run_dir / "summary.json")
    return render(run_dir)


@pytest.fixture
def summary_page(summary_html: Path, page: Page) -> Page:
    page.goto(summary_html.as_uri())
    return page


def test_the_failure_is_the_first_thing_on_the_page(summary_page: Page, run) -> None:
    summary = json.loads(DATA.read_text())
    failed = [s["nodeid"] for s in summary["scenarios"] if s["outcome"] == "failed"]
    assert failed, "the fixture run must hold a failure"
    first_heading = summary_page.locator("h2").first
    assert first_heading.inner_text() == "Failures"
    first_failure = summary_page.locator("section.failure").first
    box = first_failure.bounding_box()
    assert box is not None and box["y"] < 900, f"first failure starts at {box} px, below the fold"
    assert failed[0] in first_failure.locator("h3").inner_text()
    verdict = first_failure.locator("p strong").first.inner_text()
    assert verdict.startswith("INVALID"), verdict
    summary_page.screenshot(path=str(run.run_dir / "summary-first-screen.png"))


def test_every_fault_picture_has_data_and_a_band_for_each_fault(summary_page: Page) -> None:
    pictures = summary_page.locator(".fault-picture svg")
    assert pictures.count() >= 2, "the fixture run has fault scenarios with pictures"
    for i in range(pictures.count()):
        svg = pictures.nth(i)
        name = svg.evaluate(
            "s => s.closest('section, details').querySelector('h3, summary').textContent"
        )
        lines = svg.locator("g[id^='line2d'] path").count()
        bands = svg.locator("g[id^='fault-band-']").count()
        assert lines >= 3, f"{name}: {lines} data lines drawn"
        assert bands >= 3, f"{name}: no fault band on its three axes ({bands} bands)"
        legend = svg.locator("text").evaluate_all("ts => ts.map(t => t.textContent)")
        assert any(t.startswith("fault: ") for t in legend), f"{name}: no fault in its legend"


def test_nothing_overflows_at_1366_px(summary_page: Page) -> None:
    # Open every <details> so hidden tables are laid out and measured too.
    summary_page.evaluate("document.querySelectorAll('details').forEach(d => d.open = true)")
    width = summary_page.evaluate("document.documentElement.clientWidth")
    assert summary_page.evaluate("document.documentElement.scrollWidth") <= width
    wider = summary_page.evaluate(
        """w => [...document.querySelectorAll('body *')]
              .filter(e => !e.closest('pre') && !e.closest('svg'))
              .filter(e => e.getBoundingClientRect().right > w + 0.5)
              .map(e => e.tagName + ' ' + (e.id || e.className || e.textContent.slice(0, 40)))
              .slice(0, 5)""",
        width,
    )
    assert not wider, f"wider than the {width} px window: {wider}"


def test_the_page_needs_no_network(summary_page: Page) -> None:
    requests: list[str] = []
    summary_page.on("request", lambda r: requests.append(r.url))
    summary_page.reload()
    assert all(url.startswith("file://") for url in requests), requests
