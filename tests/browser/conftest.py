"""Playwright drives Debian's chromium: no browser download is possible here, and as root
chromium needs --no-sandbox. The page is read at 1366 px, a common laptop width.

Playwright's sync API runs an event loop in this thread while it is open, and asyncio.run()
refuses to start inside one: the browser is opened and closed within this module's tests, so
the tests after them (the services' unit tests, the scenarios) get a thread without a loop.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest
from playwright.sync_api import Browser, Page, sync_playwright

CHROMIUM = os.environ.get("QOE_CHROMIUM", "/usr/bin/chromium")
VIEWPORT = {"width": 1366, "height": 900}


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not shutil.which(CHROMIUM):
        pytest.fail(
            f"no chromium at {CHROMIUM}: bin/bootstrap installs Debian's chromium "
            "(apt-get install chromium), or set QOE_CHROMIUM to a chromium binary"
        )
    args = ["--no-sandbox"] if os.geteuid() == 0 else []
    with sync_playwright() as playwright:
        opened = playwright.chromium.launch(executable_path=CHROMIUM, args=args)
        yield opened
        opened.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport=VIEWPORT)  # type: ignore[arg-type]
    yield context.new_page()
    context.close()
