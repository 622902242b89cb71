"""Tests that need a service the machine may lack (a browser, promtool, Scrapyd, a broker).

On a developer's machine such a test skips, naming what to install. Under `CI=true` the skip is a
failure: CI provides every service, and a test skipped there would pass unseen. The hook below
(re-exported by tests/conftest.py) turns a skip whose reason names a service into a failure,
whether the test skipped through `require_service` or said so in its own words.
"""

from __future__ import annotations

import os
import re

import pytest

MISSING = "missing service"
# What a skip reason names when the service is missing; new services join this list.
SERVICES = (
    *("chromium", "chromedriver", "headless browser", "selenium"),
    *("promtool", "scrapyd", "broker", "redis", "rabbitmq", "celery"),
)
_NAMES_A_SERVICE = re.compile("|".join([re.escape(MISSING), *map(re.escape, SERVICES)]), re.IGNORECASE)


def on_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def require_service(name: str, available: bool, install: str) -> None:
    """Skips the test when `name` is not available (a failure under CI=true); `install` says how
    to get it."""
    if not available:
        pytest.skip(f"{MISSING}: {name} ({install})")


def _reason(report: pytest.TestReport) -> str:
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
    return reason.removeprefix("Skipped: ")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> object:
    outcome = yield
    report = outcome.get_result()
    if report.skipped and not hasattr(report, "wasxfail") and on_ci():
        reason = _reason(report)
        if _NAMES_A_SERVICE.search(reason):
            report.outcome = "failed"
            report.longrepr = f"CI=true, and the test would skip for a missing service: {reason}"
