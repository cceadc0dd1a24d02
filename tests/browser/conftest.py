"""Playwright (pytest-playwright) drives Debian's chromium: no browser download is possible
here, and as root chromium needs --no-sandbox. The page is read at 1366 px, a common laptop
width."""

from __future__ import annotations

import os
import shutil
from typing import Any

import pytest

CHROMIUM = os.environ.get("QOE_CHROMIUM", "/usr/bin/chromium")
VIEWPORT = {"width": 1366, "height": 900}


@pytest.fixture(scope="session")
def browser_type_launch_args(browser_type_launch_args: dict[str, Any]) -> dict[str, Any]:
    if not shutil.which(CHROMIUM):
        pytest.fail(
            f"no chromium at {CHROMIUM}: bin/bootstrap installs Debian's chromium "
            "(apt-get install chromium), or set QOE_CHROMIUM to a chromium binary"
        )
    args = ["--no-sandbox"] if os.geteuid() == 0 else []
    return {**browser_type_launch_args, "executable_path": CHROMIUM, "args": args}


@pytest.fixture(scope="session")
def browser_context_args(browser_context_args: dict[str, Any]) -> dict[str, Any]:
    return {**browser_context_args, "viewport": VIEWPORT}
