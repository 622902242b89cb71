"""Failure patterns: what kind of failure an execution error is, and a Retry-After it reported.

Pure text rules. HTTP status codes only count with HTTP context around them ("HTTP 404",
"404 Not Found", "status code 503"), so "processed 404 items" is not a missing page.
"""

from __future__ import annotations

import re
from datetime import timedelta

# Order matters: the first match wins, the specific before the general ("504 Gateway
# Timeout" is a server error, not a timeout).
_HTTP = r"(?:https?|status(?:[ _]code)?|response|code|error)\D{0,3}"

DEFAULT_PATTERNS: tuple[tuple[str, str], ...] = (
    ("rate_limited", rf"{_HTTP}\b429\b|\b429\s+too many requests|too many requests|rate[ -]?limit"),
    ("not_found", rf"{_HTTP}\b(?:404|410)\b|\b(?:404|410)\b\s*[:\-]?\s*(?:not found|gone|client error)"),
    ("forbidden", rf"{_HTTP}\b(?:401|403)\b|\b(?:401|403)\b\s*[:\-]?\s*(?:forbidden|unauthori[sz]ed|client error)"),
    (
        "server_error",
        rf"{_HTTP}\b5\d\d\b|\b5\d\d\b\s*[:\-]?\s*(?:server error|internal|bad gateway|service unavailable|gateway)"
        r"|internal server error|bad gateway|service unavailable",
    ),
    (
        "dns",
        r"name or service not known|nodename nor servname|temporary failure in name resolution"
        r"|getaddrinfo|nxdomain|no address associated|could not resolve host|dns",
    ),
    ("timeout", r"timed? ?out|timeout|etimedout|deadline exceeded"),
    (
        "network_connectivity",
        r"connection (?:refused|reset|aborted|closed)|network is unreachable|no route to host"
        r"|econnrefused|econnreset|remote ?disconnected|broken pipe|ssl|proxy error",
    ),
)
KNOWN_PATTERNS = frozenset(name for name, _ in DEFAULT_PATTERNS) | {"stuck", "unknown"}
UNKNOWN = "unknown"

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
PATTERNS_FILE_SHAPE = '{"patterns": {name: regex}, "permanent": [names]}'

_RETRY_AFTER = re.compile(r"retry-after\s*[:=]\s*(\d+)", re.IGNORECASE)


class Classifier:
    """Maps an error text to the first pattern whose regular expression matches it."""

    def __init__(self, patterns: tuple[tuple[str, str], ...] = DEFAULT_PATTERNS) -> None:
        self._compiled = tuple((name, re.compile(expr, re.IGNORECASE)) for name, expr in patterns)

    def classify(self, text: str | None) -> str:
        for name, expr in self._compiled:
            if text and expr.search(text):
                return name
        return UNKNOWN


MAX_RETRY_AFTER = timedelta(days=30)  # a site's `Retry-After` beyond this is taken as this


def bounded_retry_after(seconds: object) -> timedelta | None:
    """A `Retry-After` in seconds as a delay: None when absent or not a positive number, at most
    MAX_RETRY_AFTER (a scraper's `Retry-After: 99999999999999` would overflow the due time)."""
    try:
        value = float(seconds)  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError):
        return None
    if not value > 0:  # also NaN
        return None
    return min(timedelta(seconds=min(value, MAX_RETRY_AFTER.total_seconds())), MAX_RETRY_AFTER)


def parse_retry_after(text: str | None) -> timedelta | None:
    """The last `Retry-After: <seconds>` an executor reported (on stderr, say), if any."""
    found = _RETRY_AFTER.findall(text or "")
    return bounded_retry_after(found[-1]) if found else None


def patterns_from_json(data: object) -> tuple[tuple[tuple[str, str], ...], frozenset[str] | None]:
    """A failure-patterns file's custom (name, regex) pairs and its `permanent` list (None: absent).

    Raises `ValueError` saying, for an operator, what in the file is wrong.
    """
    if not isinstance(data, dict) or set(data) - {"patterns", "permanent"}:
        raise ValueError(f"expected {PATTERNS_FILE_SHAPE}")
    patterns = data.get("patterns", {})
    if not isinstance(patterns, dict) or not all(isinstance(v, str) for v in patterns.values()):
        raise ValueError('"patterns" must map names to regular expressions')
    for name, expression in patterns.items():
        if not _NAME.fullmatch(name):
            raise ValueError(f"pattern name {name[:60]!r} must be letters, digits and _")
        try:
            re.compile(expression, re.IGNORECASE)
        except (re.error, OverflowError, RecursionError) as exc:  # a{99999999999}, 10,000 nested groups
            raise ValueError(f"the expression of {name!r} is invalid ({exc})") from None
    permanent = data.get("permanent")
    if permanent is None:
        return tuple(patterns.items()), None
    if not (isinstance(permanent, list) and all(isinstance(p, str) for p in permanent)):
        raise ValueError('"permanent" must be a list of pattern names')
    known = KNOWN_PATTERNS | set(patterns)
    unknown = sorted(set(permanent) - known)
    if unknown:
        raise ValueError(
            f'"permanent" names an unknown failure pattern {unknown[0][:60]!r}; use some of {", ".join(sorted(known))}'
        )
    return tuple(patterns.items()), frozenset(permanent)
