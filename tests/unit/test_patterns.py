"""Failure patterns: what kind of failure an error text is."""

from __future__ import annotations

from datetime import timedelta

import pytest

from jobs.patterns import Classifier, parse_retry_after


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
