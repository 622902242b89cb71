"""Under CI=true a test that would skip for a missing service fails; elsewhere it skips."""

from __future__ import annotations

import pytest

TESTS = """
import pytest
from tests.services import require_service

def test_needs_scrapyd():
    require_service("scrapyd", False, "pip install scrapyd")

def test_in_its_own_words():
    pytest.skip("no headless browser: install the Debian packages chromium and chromium-driver")

@pytest.fixture(scope="module")
def broker():
    pytest.skip("no broker: start redis")

def test_behind_a_fixture(broker):
    pass

def test_skips_for_another_reason():
    pytest.skip("building the sandbox needs root")

def test_needs_nothing_missing():
    require_service("promtool", True, "apt-get install prometheus")
"""


@pytest.fixture
def suite(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makeconftest("from tests.services import pytest_runtest_makereport  # noqa: F401\n")
    pytester.makepyfile(test_services_inner=TESTS)
    return pytester


@pytest.mark.parametrize("value", ["true", "1"])
def test_on_ci_a_missing_service_fails_the_test(suite, monkeypatch, value):
    monkeypatch.setenv("CI", value)
    result = suite.runpytest("-p", "no:xdist", "-p", "no:cacheprovider", "-rfs")
    result.assert_outcomes(failed=2, errors=1, skipped=1, passed=1)  # a fixture's skip fails its setup
    result.stdout.fnmatch_lines(
        [
            "*CI=true, and the test would skip for a missing service: no broker: start redis",  # errors come first
            "*CI=true, and the test would skip for a missing service: missing service: scrapyd (pip install scrapyd)",
        ]
    )
    assert "test_skips_for_another_reason" not in "\n".join(line for line in result.outlines if "FAILED" in line)


@pytest.mark.parametrize("value", [None, "", "false"])
def test_elsewhere_a_missing_service_skips_naming_what_to_install(suite, monkeypatch, value):
    if value is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", value)
    result = suite.runpytest("-p", "no:xdist", "-p", "no:cacheprovider", "-rs")
    result.assert_outcomes(skipped=4, passed=1)
    result.stdout.fnmatch_lines(["*missing service: scrapyd (pip install scrapyd)*"])
