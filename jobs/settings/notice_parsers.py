"""The parsers of SPEC §15's settings: where notifications link to, which events notify, and
what a run scrapes (TARGET). Like every parser (jobs/settings/parsers.py): the text and the name it
came by in, the value or one line of `ConfigError` out.
"""

from __future__ import annotations

import re

from db.errors import ConfigError
from jobs.alerts import EVENT_KINDS
from jobs.settings.parsers import _IDENTIFIER, IDENTIFIER_MAX_LENGTH, _is_host, shown


def parse_public_url(text: str, name: str) -> str:
    """Where people open `serve`'s pages (behind a proxy, say): http(s)://host[:port][/path], no
    credentials (it is written into messages), no query."""
    from urllib.parse import urlsplit

    value = str(text).strip().rstrip("/")
    example = "e.g. https://stuck-runs.example.com"
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError:
        parts, port = None, -1
    if parts is None or parts.scheme.lower() not in ("http", "https") or not _is_host(parts.hostname or ""):
        raise ConfigError(f"{name}={shown(value)} is not an http(s) URL: {example}")
    if parts.username or parts.password or parts.query or parts.fragment or port in (-1, 0):
        raise ConfigError(f"{name}: write the pages' address only, with no credentials, query or #: {example}")
    return value


def parse_events(text: str, name: str) -> frozenset[str]:
    """ALERT_EVENTS: `stuck,permanent` (commas or spaces); an unknown kind is refused, naming the known."""
    chosen = [part for part in str(text).replace(",", " ").split() if part]
    for kind in chosen:
        if kind not in EVENT_KINDS:
            raise ConfigError(f"{name}: unknown event {shown(kind)}: use some of {', '.join(EVENT_KINDS)}")
    if not chosen:
        raise ConfigError(f"{name} names no event: use some of {', '.join(EVENT_KINDS)}, or unset it for all")
    return frozenset(chosen)


_HOST_OF = re.compile(r"host\(\s*([A-Za-z_][A-Za-z0-9_]*)\s*\)", re.IGNORECASE)


def parse_target(text: str, name: str = "TARGET") -> str:
    """What a run scrapes (SPEC §15): a column (`site`) or the host of a URL column
    (`host(start_url)`). Whether the table has that text column is checked against the table."""
    value = str(text).strip()
    host = _HOST_OF.fullmatch(value)
    if host:
        return f"host({host[1]})"
    if _IDENTIFIER.fullmatch(value) and len(value) <= IDENTIFIER_MAX_LENGTH:
        return value
    raise ConfigError(
        f"{name}={shown(value)} is not accepted: use a column (site) or the host of a URL column (host(start_url))"
    )
