"""Fixtures of the dashboard tests: a store filled by the demo, dashboards, a runner, a browser.

Everything here is shared by the package's tests (one demo, one runner, one browser),
which keeps them fast; each test makes its own flows, runs and dead letters.

The browser is Debian's chromium (/usr/bin/chromium) driven by Playwright's Python
package: Playwright's own browser download does not work on these machines. Without
chromium or playwright the browser tests skip, and fail instead when ``CI`` is set.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from .helpers import (
    CHROMIUM,
    CHROMIUM_ARGS,
    IN_CI,
    TOKEN,
    Dashboard,
    Runner,
    demo_store,
    interplay_process,
    non_loopback_ip,
    start_dashboard,
    stop_process,
)

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page

def _missing_browser() -> str | None:
    if not Path(CHROMIUM).exists():
        return f"chromium is not installed ({CHROMIUM}): apt-get install -y chromium chromium-driver"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed: pip install -e '.[dev]'"
    return None


@pytest.fixture(scope="package")
def store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A SQLite store filled by ``interplay demo``."""
    return demo_store(tmp_path_factory.mktemp("store"))


@pytest.fixture(scope="package")
def runner(store: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runner]:
    """``interplay run tests.browser.apps:app`` on the store: handles jobs, runs workflows."""
    log = tmp_path_factory.mktemp("runner") / "runner.log"
    proc = interplay_process(["run", "tests.browser.apps:app", "--store", store], log)
    runner = Runner(proc, log)
    try:
        runner.wait_until_hosting()
        yield runner
    finally:
        stop_process(proc)


@pytest.fixture(scope="package")
def dashboard(store: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dashboard]:
    """``interplay dashboard`` on 127.0.0.1 without a token, drawing the demo app's declared map too."""
    with start_dashboard(store, tmp_path_factory.mktemp("dashboard") / "dashboard.log",
                         args=("--app", "interplay.examples.orders:app")) as dash:
        yield dash


@pytest.fixture(scope="package")
def guarded(store: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dashboard]:
    """``interplay dashboard`` on a non-loopback address (0.0.0.0 if there is none), its token from the env."""
    address = non_loopback_ip()
    log = tmp_path_factory.mktemp("guarded") / "dashboard.log"
    with start_dashboard(store, log, host=address or "0.0.0.0", connect=address or "127.0.0.1",
                         env={"INTERPLAY_DASHBOARD_TOKEN": TOKEN}) as dash:
        yield dash


@pytest.fixture(scope="package")
def browser() -> Iterator[Browser]:
    """Headless chromium (skipped without it, failed in CI)."""
    missing = _missing_browser()
    if missing:
        if IN_CI:
            pytest.fail(f"{missing}, and CI is set: the browser tests may not skip")
        pytest.skip(missing)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        launched = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    """A fresh browser context and page; confirm() dialogs are accepted; CSP violations fail the test."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    context.set_default_timeout(10_000)
    page = context.new_page()
    page.on("dialog", lambda dialog: dialog.accept())
    problems: list[str] = []
    page.on("console", lambda msg: problems.append(msg.text) if msg.type == "error" else None)
    page.on("pageerror", lambda exc: problems.append(str(exc)))
    try:
        yield page
    finally:
        context.close()
    assert not [p for p in problems if "Content Security Policy" in p or "Refused to" in p], problems
