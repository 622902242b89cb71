"""ALERT_URLS (SPEC §15): notification URLs read, named and sent to by Apprise, never by senders
of our own.

Apprise splits the setting (a `mailto://…?to=a,b` stays whole), knows each URL's service (Slack,
E-Mail, JSON...) and shows a URL with its secrets masked (`slack://T...1/B...2/C...3`). What it
logs of a failed delivery is captured and returned as the error, scrubbed of every part of the
URL that its masked form hides: no token, password or webhook path reaches a log or a screen.
"""

from __future__ import annotations

import logging
import re
import warnings
from dataclasses import dataclass, field
from datetime import timedelta
from functools import cache

from db.errors import ConfigError

# A notification waits at most this long for a connection, and as long again for the answer (less
# when the URL's `cto`/`rto` say so): a receiver that hangs costs the sending thread this much,
# never a sweep or a retry.
SEND_TIMEOUT = timedelta(seconds=10)
_SECRET_PART = re.compile(r"[^/:@?&=,;+\s]{3,}")  # the pieces of a URL a secret could be


@cache
def _apprise():  # noqa: ANN202 - the module, imported once, quietly
    """Apprise, its plugins loaded. Its e-mail plugin imports the standard library's deprecated
    `imghdr` (a DeprecationWarning on 3.11/3.12) and its logger would reach stderr through
    Python's last-resort handler: neither is ours to show."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import apprise
        from apprise.manager_plugins import NotificationManager

        NotificationManager().load_modules()
    quiet = logging.getLogger("apprise")
    quiet.addHandler(logging.NullHandler())
    quiet.propagate = False  # what it says of a failure is captured and scrubbed (`send`), never passed on
    return apprise


@dataclass(frozen=True)
class AlertUrl:
    """One notification URL: the text as given (a secret), its service and its masked form."""

    text: str = field(repr=False)
    service: str  # as Apprise names it: Slack, E-Mail, JSON, ntfy...
    shown: str  # the URL with its secrets masked, without its options

    def hide(self, message: str) -> str:
        """`message` without any piece of this URL that its masked form does not show."""
        return hide_secrets(message, (self,))

    def secrets(self) -> set[str]:
        visible = self.shown
        return {part for part in _SECRET_PART.findall(self.text) if part not in visible}


def hide_secrets(message: str, urls: tuple[AlertUrl, ...]) -> str:
    for secret in sorted({s for url in urls for s in url.secrets()}, key=len, reverse=True):
        message = message.replace(secret, "…")
    return message


def _ordinal(number: int) -> str:
    return {1: "1st", 2: "2nd", 3: "3rd"}.get(number, f"{number}th")


def parse_alert_urls(text: str, name: str) -> tuple[AlertUrl, ...]:
    """The URLs of `text` as Apprise splits them (spaces, commas); one it cannot read is refused
    in a line that names its place and its scheme, never its secrets."""
    apprise = _apprise()
    from apprise.utils.parse import parse_urls

    pieces = parse_urls(str(text))
    if not pieces:
        raise ConfigError(f"{name} holds no URL: give one such as slack://TokenA/TokenB/TokenC, or unset it")
    urls = []
    for number, piece in enumerate(pieces, start=1):
        scheme = piece.partition("://")[0] if "://" in piece else None
        plugin = apprise.Apprise.instantiate(piece, suppress_exceptions=True) if scheme else None
        if plugin is None:
            where = f"the {_ordinal(number)} URL" + (f" ({scheme}://…)" if scheme and scheme.isalnum() else "")
            raise ConfigError(
                f"{name}: {where} is not a notification URL Apprise can read: write it as Apprise documents "
                "for its service (slack://…, mailto://…, json://host/path, ntfy://topic, …)"
            )
        shown = plugin.url(privacy=True).split("?", 1)[0].rstrip("/")
        urls.append(AlertUrl(piece, str(plugin.service_name), shown))
    return tuple(urls)


def _bound(plugin) -> None:  # noqa: ANN001
    """Apprise's own timeouts (its `cto` and `rto` URL options), capped by SEND_TIMEOUT."""
    cap = SEND_TIMEOUT.total_seconds()
    for name in ("socket_connect_timeout", "socket_read_timeout"):
        given = getattr(plugin, name, None)
        setattr(plugin, name, cap if given is None else min(float(given), cap))


def send(url: AlertUrl, title: str, body: str) -> str | None:
    """Sends one message to `url`; None when it was delivered, else what went wrong (one line, no
    secret). Bounded by SEND_TIMEOUT for the connection and again for the answer."""
    apprise = _apprise()
    plugin = apprise.Apprise.instantiate(url.text, suppress_exceptions=True)
    if plugin is None:  # parsed at start-up: cannot happen, unless Apprise changed under us
        return "Apprise cannot read this URL"
    _bound(plugin)
    with apprise.LogCapture(level=logging.WARNING, fmt="%(message)s") as captured:
        try:
            delivered = plugin.notify(body=body, title=title)
        except Exception as exc:  # noqa: BLE001 - a plugin's bug must not reach the sweep's thread
            return url.hide(f"{type(exc).__name__}: {exc}")
        said = " ".join(captured.getvalue().split())
    if delivered:
        return None
    return url.hide(said or "not delivered")
