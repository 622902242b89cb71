"""The parsers of the engines' settings (SPEC §16): a Celery broker's URL, a task's or queue's name.
A secret never shows in what they say: a broker URL's password is left out of every error."""

from __future__ import annotations

import re
from urllib.parse import urlsplit

from db.errors import ConfigError
from jobs.settings.parsers import shown

BROKER_SCHEMES = ("redis", "rediss", "amqp", "amqps", "pyamqp", "sentinel")
_TASK_NAME = re.compile(r"[A-Za-z_][\w.:-]{0,199}")


def parse_broker_url(text: str, name: str) -> str:
    """A Celery broker URL: a scheme Celery's brokers speak (with revoke and priorities), a host and,
    if given, a port; several separated by `;` (Celery's failover, Sentinel's list), each so."""
    url = str(text).strip()
    for each in url.split(";"):
        check_broker_url(each.strip(), name)
    return url


def check_broker_url(url: str, name: str) -> None:
    try:
        parts = urlsplit(url)
        host = parts.hostname
    except ValueError:
        parts, host = None, None
    scheme = parts.scheme.lower() if parts else ""
    said = shown(f"{scheme}://…") if scheme else "(not a URL)"
    if scheme not in BROKER_SCHEMES or not host:
        raise ConfigError(
            f"{name}={said} is not a broker URL: use redis://host:6379/0 or amqp://user@host// "
            "(a password goes in the URL; it is never shown)"
        )
    try:
        parts.port  # noqa: B018 - urlsplit checks the port only when it is read
    except ValueError:
        raise ConfigError(
            f"{name}={said} has a port that is not a number from 0 to 65535: e.g. redis://host:6379/0 "
            "(several brokers are separated by ';', each a whole URL)"
        ) from None


def parse_task_name(text: str, name: str) -> str:
    task = str(text).strip()
    if not _TASK_NAME.fullmatch(task):
        raise ConfigError(f"{name}={shown(task)} is not a Celery task or queue name: e.g. scraper.tasks.scrape")
    return task
