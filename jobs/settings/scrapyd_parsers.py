"""The parsers of SPEC §16's Scrapyd settings: its URL (credentials taken out of it, never shown),
the spider's template and the spider arguments. Their `{column}` placeholders are checked against
the table once it is reflected (jobs/runtime.py `check_placeholders`).
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit, urlunsplit

from db.errors import ConfigError
from jobs.settings.parsers import COMMAND_PLACEHOLDER, _is_host, shown

# schedule.json's own parameters: a spider argument of one of these names would change the job.
RESERVED_ARGUMENTS = frozenset({"project", "spider", "jobid", "priority", "setting", "_version", "_job"})
_PROJECT = re.compile(r"[A-Za-z0-9_.-]+")
_ARGUMENT_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True)
class ScrapydUrl:
    """Scrapyd's root URL without credentials (`base`, fit to show), and the credentials it held."""

    base: str
    username: str | None = None
    password: str | None = field(default=None, repr=False)

    def __str__(self) -> str:
        return self.base


def parse_scrapyd_url(text: str, name: str) -> ScrapydUrl:
    """An http(s) URL of Scrapyd's root; `user:password@` in it is taken out (basic auth)."""
    raw = str(text).strip()
    example = "e.g. http://scrapyd.internal:6800"
    try:
        parts = urlsplit(raw)
        port = parts.port
    except ValueError:
        raise ConfigError(f"{name} is not a URL: {example}") from None
    # Shown without user:password@ and without a query: either may hold a secret.
    said = shown(urlunsplit((parts.scheme, (parts.hostname or "") + (f":{port}" if port else ""), parts.path, "", "")))
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{name}={said} is not an http(s) URL: {example}")
    if not _is_host(parts.hostname) or port == 0:
        raise ConfigError(f"{name}={said} has no valid host and port: {example}")
    if parts.query or parts.fragment or "{" in raw or "}" in raw:
        raise ConfigError(f"{name}={said} takes no query, fragment or placeholder: Scrapyd's root only, {example}")
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    base = urlunsplit((parts.scheme.lower(), host + (f":{port}" if port else ""), parts.path.rstrip("/"), "", ""))
    username = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password is not None else None
    return ScrapydUrl(base, username, password)


def parse_scrapyd_project(text: str, name: str) -> str:
    project = str(text).strip()
    if not project or not _PROJECT.fullmatch(project):
        raise ConfigError(f"{name}={shown(project)} is not a Scrapyd project name: letters, digits, '_', '-' and '.'")
    return project


def parse_scrapyd_username(text: str, name: str) -> str:
    user = str(text).strip()
    if ":" in user or not user.isprintable():
        raise ConfigError(f"{name}={shown(user)} is not a basic-auth user name: no ':' and no control character")
    return user


def parse_scrapyd_password(text: str, name: str) -> str:
    if not str(text).isprintable():  # the value is a secret: never repeated
        raise ConfigError(f"{name} holds a control character: write the password alone")
    return str(text)


def _placeholders(template: str, name: str) -> list[str]:
    """The `{column}` names of a template; `ConfigError` for one that is no plain placeholder."""
    try:
        items = [(f, spec, conv) for _, f, spec, conv in string.Formatter().parse(template) if f is not None]
    except ValueError as exc:
        raise ConfigError(
            f"{name}: {shown(template)} is not a template ({exc}): write {{column}} placeholders"
        ) from None
    for item, spec, conv in items:
        if spec or conv or not COMMAND_PLACEHOLDER.fullmatch(item):
            raise ConfigError(
                f"{name}: {{{item}}} is not a placeholder: use {{run_id}} or {{column}} for an input column"
            )
    return [item for item, _, _ in items]


def parse_scrapyd_spider(text: str, name: str) -> str:
    """The spider's name, or a template choosing it from the run's columns (`{site}_spider`)."""
    template = str(text).strip()
    if not template:
        raise ConfigError(f"{name} is empty: name the spider, e.g. jobs or {{site}}")
    _placeholders(template, name)
    return template


def parse_scrapyd_args(text: str, name: str) -> tuple[tuple[str, str], ...]:
    """`name=template,...`: the spider arguments, each a template of the run's columns."""
    pairs = []
    for item in (part.strip() for part in str(text).split(",")):
        if not item:
            continue
        argument, sep, template = item.partition("=")
        argument = argument.strip()
        if not sep or not _ARGUMENT_NAME.fullmatch(argument):
            raise ConfigError(
                f"{name}: {shown(item)} is not name=template: write e.g. query={{search_query}},location={{location_query}}"
            )
        if argument in RESERVED_ARGUMENTS:
            raise ConfigError(
                f"{name}: {argument} is one of schedule.json's own parameters: give the argument another name"
            )
        _placeholders(template, name)
        pairs.append((argument, template))
    names = [argument for argument, _ in pairs]
    if len(set(names)) != len(names):
        twice = next(a for a in names if names.count(a) > 1)
        raise ConfigError(f"{name}: {twice} is given twice: give each argument once")
    return tuple(pairs)


def scrapyd_templates(spider: str | None, args: tuple[tuple[str, str], ...]) -> list[tuple[str, str]]:
    """(setting, template) of every Scrapyd template, for the check against the table's columns."""
    return [("SCRAPYD_SPIDER", spider)] * bool(spider) + [("SCRAPYD_ARGS", template) for _, template in args]
