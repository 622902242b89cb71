"""The parsers of settings: each takes the text an operator wrote and the name it came by (the
variable or the flag), and returns the value or raises `ConfigError` with one line naming that
name, the value and what is accepted. Nothing here reads the environment.
"""

from __future__ import annotations

import ipaddress
import json
import re
import shlex
import string
from datetime import timedelta

from db.errors import ConfigError
from jobs.patterns import PATTERNS_FILE_SHAPE, patterns_from_json

MAX_DURATION = timedelta(days=3650)  # ten years: past any sane setting, far from datetime's and SQL's limits
DURATION_HELP = f"use 90s, 30m, 1h, 4h, 1d or plain seconds, up to {MAX_DURATION.days}d"
_DURATION = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", re.IGNORECASE | re.ASCII)
_UNIT_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")  # always fullmatch: `$` would let a newline through
IDENTIFIER_MAX_LENGTH = 63  # PostgreSQL cuts longer names silently, and would find another table
PATTERNS_FILE_MAX_BYTES = 1_000_000
_PORT = re.compile(r"[0-9]{1,5}")
_URL_PARTS = re.compile(  # SQLAlchemy's own split of a URL, kept raw: '@' and %40 differ here
    r"[\w+]+://(?:[^:/]*(?::[^@]*)?@)?(?P<host>\[[^/?]+\]|[^/:?]+)?(?::(?P<port>[^/?]*))?(?P<database>/[^?]*)?"
)
LOG_LEVELS = ("TRACE", "DEBUG", "INFO", "SUCCESS", "WARNING", "ERROR", "CRITICAL")
# `{run_id}`, and any input column of the table (checked once the table is reflected).
COMMAND_PLACEHOLDER = re.compile(r"[A-Za-z_][A-Za-z0-9_$]*")


def shown(text: object) -> str:
    """A value quoted for an error line: escaped (newlines, NUL...), and cut when enormous."""
    text = str(text)
    return repr(text) if len(text) <= 100 else f"{text[:60]!r}… ({len(text)} characters)"


def parse_duration(text: str, name: str, *, allow_zero: bool = False) -> timedelta:
    """`90s`, `30m`, `1h`, `4h`, `1d` or plain seconds (`3600`), at most `MAX_DURATION`."""
    match = _DURATION.fullmatch(str(text))
    if not match:
        raise ConfigError(f"{name}={shown(text)} is not a duration: {DURATION_HELP}")
    seconds = float(match.group(1)) * _UNIT_SECONDS[match.group(2).lower()]
    if not seconds <= MAX_DURATION.total_seconds():  # an endless string of digits is inf
        raise ConfigError(f"{name}={shown(text)} is too long: use at most {MAX_DURATION.days}d (ten years)")
    value = timedelta(seconds=seconds)
    if value <= timedelta(0) and not (allow_zero and value == timedelta(0)):
        raise ConfigError(f"{name}={shown(text)} must be longer than zero: {DURATION_HELP}")
    return value


def parse_int(text: str, name: str, *, minimum: int, maximum: int | None = None) -> int:
    digits = str(text).strip()
    try:
        value = int(digits) if digits.isascii() else None  # int() takes '１９１０１' too
    except ValueError:
        value = None
    if value is None or value < minimum or (maximum is not None and value > maximum):
        bounds = f"from {minimum} to {maximum}" if maximum is not None else f"{minimum} or more"
        raise ConfigError(f"{name}={shown(text)} is not accepted: use a whole number {bounds}")
    return value


def parse_fraction(text: str, name: str) -> float:
    try:
        value = float(str(text).strip())
    except ValueError:
        value = -1.0
    if not 0.0 <= value <= 1.0:
        raise ConfigError(f"{name}={shown(text)} is not accepted: use a fraction from 0 to 1, such as 0.1")
    return value


def parse_switch(text: str, name: str) -> bool:
    """`on` or `off` (and true/false, yes/no, 1/0)."""
    word = str(text).strip().lower()
    if word in ("on", "true", "yes", "1"):
        return True
    if word in ("off", "false", "no", "0"):
        return False
    raise ConfigError(f"{name}={shown(text)} is not accepted: use on or off")


def parse_margin(text: str, name: str) -> float:
    """A factor from 1 to 100 (`2`, `1.5`): a learned limit is the p99 runtime times it."""
    try:
        value = float(str(text).strip())
    except ValueError:
        value = 0.0
    if not 1.0 <= value <= 100.0:
        raise ConfigError(f"{name}={shown(text)} is not accepted: use a factor from 1 to 100, such as 2")
    return value


def parse_kind_limits(text: str, name: str) -> dict[str, timedelta]:
    """`jobs_de=15m,sitemap_full=8h`: a limit per kind of run (SPEC §14)."""
    limits: dict[str, timedelta] = {}
    for item in str(text).split(","):
        if not item.strip():
            continue
        kind, sep, duration = (part.strip() for part in item.partition("="))
        if not sep or not kind or not duration:
            raise ConfigError(
                f"{name}: {shown(item.strip())} is not kind=duration: write it as jobs_de=15m,sitemap_full=8h"
            )
        if kind in limits:
            raise ConfigError(f"{name}: the kind {shown(kind)} is given twice: give each kind one limit")
        limits[kind] = parse_duration(duration, f"{name} {shown(kind)}")
    if not limits:
        raise ConfigError(f"{name}={shown(text)} names no kind: write it as jobs_de=15m,sitemap_full=8h")
    return limits


def parse_choice(text: str, name: str, choices: tuple[str, ...], *, upper: bool = False) -> str:
    value = str(text).strip()
    value = value.upper() if upper else value.lower()
    if value not in choices:
        raise ConfigError(f"{name}={shown(text)} is not accepted: use one of {', '.join(choices)}")
    return value


def parse_identifier(text: str, name: str, *, qualified: bool = False) -> str:
    parts = str(text).strip().split(".")
    if not (1 <= len(parts) <= (2 if qualified else 1)) or not all(_IDENTIFIER.fullmatch(p) for p in parts):
        shape = "a table name such as scrape_runs or myschema.scrape_runs" if qualified else "a column name"
        raise ConfigError(f"{name}={shown(text)} is not accepted: use {shape} (letters, digits, _)")
    if any(len(part) > IDENTIFIER_MAX_LENGTH for part in parts):
        raise ConfigError(
            f"{name}={shown(text)} is not accepted: PostgreSQL names have at most {IDENTIFIER_MAX_LENGTH} characters"
        )
    return str(text).strip()


def parse_database_url(text: str, name: str) -> str:
    """A PostgreSQL URL, normalised to the psycopg2 driver. No error repeats any of the password."""
    # Imported here: SQLAlchemy costs a seventh of a second, and `--help` needs no URL.
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    from db.engine import redacted

    text = str(text).strip()
    example = "postgresql://user:password@host:5432/dbname"
    parts = _URL_PARTS.match(text)
    if parts and "@" in "".join(part or "" for part in parts.group("host", "port", "database")):
        raise ConfigError(f"{name} holds an '@' after the one before the host: write an '@' in the password as %40")
    if parts and parts["port"] and not (_PORT.fullmatch(parts["port"]) and 0 < int(parts["port"]) <= 65535):
        raise ConfigError(
            f"{name}: port {shown(parts['port'])} is not accepted: use a number from 1 to 65535 ({example})"
        )
    try:
        url = make_url(text)
    except (ArgumentError, ValueError):
        raise ConfigError(f"{name} is not a database URL: use {example}") from None
    if url.drivername == "postgres":  # what Heroku and libpq also accept
        url = url.set(drivername="postgresql")
    if url.get_backend_name() != "postgresql":
        raise ConfigError(f"{name}={redacted(url)!r} is not a PostgreSQL URL: use {example}")
    values = [url.username, url.password, url.host, url.database, *url.query]
    values += [value for many in url.normalized_query.values() for value in many]
    if any("\x00" in value for value in values if value):
        raise ConfigError(f"{name} holds a NUL byte (%00): no connection parameter accepts one")
    if not all(_IDENTIFIER.fullmatch(key) for key in url.query):
        raise ConfigError(f"{name}: a query parameter is not a libpq keyword such as sslmode: check what follows '?'")
    return url.set(drivername="postgresql+psycopg2").render_as_string(hide_password=False)


def parse_command(text: str, name: str) -> tuple[str, ...]:
    """An argv template; placeholders stay inside single argv items, nothing goes through a shell."""
    try:
        argv = tuple(shlex.split(str(text)))
    except ValueError as exc:
        raise ConfigError(f"{name}={shown(text)} cannot be split into arguments ({exc}): check its quotes") from None
    if not argv:
        raise ConfigError(f"{name} is empty: give a command such as 'python -m scraper --run-id {{run_id}}'")
    for item in argv:
        try:
            fields = [f for _, f, _, _ in string.Formatter().parse(item) if f is not None]
        except ValueError as exc:
            raise ConfigError(
                f"{name}: {shown(item)} is not a valid template ({exc}); write {{{{ for a literal brace"
            ) from None
        unknown = sorted(f for f in fields if not COMMAND_PLACEHOLDER.fullmatch(f))
        if unknown:
            raise ConfigError(
                f"{name}: {{{unknown[0]}}} is not a placeholder; use {{run_id}} or {{column}} for an input column"
            )
    return argv


def parse_webhook(text: str, name: str) -> str:
    """A URL template: `{run_id}` and `{column}` placeholders in its path and query only, so that no
    run's input can send a retry to another host."""
    from urllib.parse import urlsplit

    template = str(text).strip()
    example = "e.g. https://scraper.internal/api/scrape-jobs/{run_id}/retry"
    # The query or a user:password@ may carry a secret: an error line shows the URL without them.
    bare = re.sub(r"//[^/?#]*@", "//…@", template.split("?", 1)[0], count=1)
    said = shown(bare + ("?…" if "?" in template else ""))
    try:
        parsed = [(f, spec, conv) for _, f, spec, conv in string.Formatter().parse(template) if f is not None]
        parts = urlsplit(template)
    except ValueError as exc:
        raise ConfigError(f"{name}={said} is not a URL template ({exc}): {example}") from None
    if parts.scheme.lower() not in ("http", "https") or not parts.netloc:
        raise ConfigError(f"{name}={said} is not an http(s) URL: {example}")
    if "{" in parts.netloc or "}" in parts.netloc or parts.username or parts.password:
        raise ConfigError(
            f"{name}: the host part of {said} must be written out (no placeholder, no credentials); "
            "put {placeholders} in the path or query, and a secret in WEBHOOK_SECRET"
        )
    try:
        port = parts.port
    except ValueError:
        port = -1
    host = parts.hostname or ""
    if port == -1 or port == 0 or not _is_host(host):
        raise ConfigError(
            f"{name}={said} has no valid host and port: write https://host[:port]/path, "
            "the port a number from 1 to 65535"
        )
    for item, spec, conv in parsed:
        if spec or conv or not COMMAND_PLACEHOLDER.fullmatch(item):
            shown_item = item + (f"!{conv}" if conv else "") + (f":{spec}" if spec else "")
            raise ConfigError(
                f"{name}: {{{shown_item}}} is not a placeholder (no !conversion, no :format); "
                "use {run_id} or {column} for an input column"
            )
    return template


_HOST_NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*\.?")


def _is_host(host: str) -> bool:
    """A DNS name or an IP address (IPv6 without its brackets, as urlsplit gives it)."""
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return bool(_HOST_NAME.fullmatch(host)) and len(host) <= 253


MAX_WEBHOOK_TIMEOUT = timedelta(minutes=10)


def parse_webhook_timeout(text: str, name: str) -> timedelta:
    """How long one delivery may take; the retry's row stays locked meanwhile, so it is bounded."""
    value = parse_duration(text, name)
    if value > MAX_WEBHOOK_TIMEOUT:
        raise ConfigError(
            f"{name}={shown(text)} is too long: use at most 10m (a delivery holds its retry's row locked)"
        )
    return value


def parse_handoff(text: str, name: str) -> str:
    state = str(text).strip()
    if state != "queued":
        raise ConfigError(
            f"{name}={shown(state)} is not the state retries are handed off in: use queued, and map it in STATUS_MAP "
            "to your workers' waiting value (e.g. STATUS_MAP=queued=pending)"
        )
    return state


def parse_callable(text: str, name: str) -> str:
    module, sep, func = str(text).strip().partition(":")
    if not sep or not all(_IDENTIFIER.fullmatch(p) for p in module.split(".") + func.split(".")):
        raise ConfigError(f"{name}={shown(text)} is not accepted: use package.module:function")
    return str(text).strip()


def parse_patterns(text: str, name: str) -> frozenset[str]:
    """Pattern names; checked against the known ones (custom included) once all is read."""
    return frozenset(p.strip() for p in str(text).split(",") if p.strip())


def parse_patterns_file(text: str, name: str) -> tuple[tuple[tuple[str, str], ...], frozenset[str] | None]:
    """A UTF-8 JSON file: {"patterns": {"captcha": "regex", ...}, "permanent": ["not_found", ...]}.

    Its patterns are tried before the built-in ones; its `permanent` list (optional) replaces
    the default one.
    """
    path = str(text).strip()
    where = f"{name}={shown(path)}"
    try:
        with open(path, "rb") as handle:
            raw = handle.read(PATTERNS_FILE_MAX_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"{where} cannot be read: {exc.strerror or exc}") from None
    if len(raw) > PATTERNS_FILE_MAX_BYTES:
        raise ConfigError(f"{where} is larger than {PATTERNS_FILE_MAX_BYTES // 1_000_000} MB: is it the right file?")
    try:
        data = json.loads(raw.decode("utf-8-sig"))
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{where} is not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start}): save it as UTF-8"
        ) from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{where} is not valid JSON (line {exc.lineno}): {exc.msg}") from None
    except RecursionError:
        raise ConfigError(f"{where} is nested too deeply: expected {PATTERNS_FILE_SHAPE}") from None
    try:
        return patterns_from_json(data)
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None


TOKEN_MIN_LENGTH = 16
_TOKEN = re.compile(r"[\x21-\x7e]+")  # printable ASCII, no spaces: it travels in a header and a form
_HOST_LABEL = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
TOKEN_MAX_LENGTH = 1024


def parse_token(text: str, name: str) -> str:
    """A bearer token. No error repeats any of it."""
    value = str(text).strip()
    if not _TOKEN.fullmatch(value):
        raise ConfigError(f"{name} holds a space or a character that is not printable ASCII: use letters and digits")
    if len(value) > TOKEN_MAX_LENGTH:
        raise ConfigError(f"{name} is too long ({len(value)} characters): use at most {TOKEN_MAX_LENGTH}")
    if len(value) < TOKEN_MIN_LENGTH:
        raise ConfigError(
            f"{name} is too short ({len(value)} characters): use at least {TOKEN_MIN_LENGTH} random ones, "
            "such as the output of `openssl rand -hex 32`"
        )
    return value


def parse_host(text: str, name: str) -> str:
    """An address or host name to listen on (`127.0.0.1`, `::1`, `0.0.0.0`, `localhost`)."""
    value = str(text).strip()
    bare = value[1:-1] if value.startswith("[") and value.endswith("]") else value
    try:
        return str(ipaddress.ip_address(bare))
    except ValueError:
        pass
    labels = bare.split(".")
    is_name = len(bare) <= 253 and all(_HOST_LABEL.fullmatch(label) for label in labels)
    if not is_name or all(label.isdigit() for label in labels):  # '999.1.1.1' is no address and no name
        raise ConfigError(f"{name}={shown(text)} is not accepted: use an address such as 127.0.0.1 or 0.0.0.0")
    return bare


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name other than localhost may resolve anywhere
