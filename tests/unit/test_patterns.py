"""Failure patterns: what kind of failure an error text is."""

from __future__ import annotations

from datetime import timedelta

import pytest

from jobs.patterns import MAX_RETRY_AFTER, Classifier, bounded_retry_after, parse_retry_after


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        ("HTTP Error 404: Not Found", "not_found"),
        ("404 Client Error: Not Found for url: https://jobs.example/x", "not_found"),
        ("response status 410", "not_found"),
        ("HTTP 403 Forbidden", "forbidden"),
        ("401 Unauthorized", "forbidden"),
        ("HTTP 429 Too Many Requests", "rate_limited"),
        ("HTTP 503 Service Unavailable", "server_error"),
        ("502 Bad Gateway", "server_error"),
        ("504 Gateway Timeout", "server_error"),
        ("Execution timed out after 1.0h", "timeout"),
        ("ReadTimeout: read timed out", "timeout"),
        ("Connection refused", "network_connectivity"),
        ("ConnectionResetError: [Errno 104] Connection reset by peer", "network_connectivity"),
        ("socket.gaierror: [Errno -2] Name or service not known", "dns"),
        ("processed 404 items before the parser broke", "unknown"),
        ("ValueError: could not parse salary", "unknown"),
        ("", "unknown"),
    ],
)
def test_classification(text, pattern):
    assert Classifier().classify(text) == pattern


def test_retry_after_is_read_from_the_last_report():
    assert parse_retry_after("429\nRetry-After: 60\nretry-after: 120") == timedelta(seconds=120)
    assert parse_retry_after("no header here") is None
    assert parse_retry_after(None) is None


@pytest.mark.parametrize("huge", ["99999999999999", "9" * 400])
def test_an_enormous_retry_after_is_capped_not_an_overflow(huge):
    assert parse_retry_after(f"429\nRetry-After: {huge}") == MAX_RETRY_AFTER


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (60, timedelta(seconds=60)),
        (1e300, MAX_RETRY_AFTER),
        (float("inf"), MAX_RETRY_AFTER),
        (float("nan"), None),
        (-5, None),
        (0, None),
        ("soon", None),
        (None, None),
    ],
)
def test_a_callables_retry_after_is_bounded(value, expected):
    assert bounded_retry_after(value) == expected
