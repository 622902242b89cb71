"""The database edge: engines that speak UTC, driver errors turned into operator errors, and the
one place that decides what of a connection may be shown.

Every connection runs with `TimeZone=UTC`, so `timestamp without time zone` columns read and
compare as UTC, and an `application_name` naming host and pid, so `pg_stat_activity` and the
lock holders we report say who is who. A URL is shown through `redacted`, a driver error through
`describe_db_error`: neither ever carries a secret, however PostgreSQL was given it.
"""

from __future__ import annotations

import getpass
import os
import re
import socket
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote, quote_plus

from sqlalchemy import create_engine, event
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.exc import ArgumentError, InterfaceError, OperationalError

from db.errors import DatabaseUnavailable

CONNECT_TIMEOUT_SECONDS = 10
SECRET_PARAMETERS = frozenset({"password", "sslpassword"})  # libpq parameters whose value is a secret
HIDDEN = "***"
SHORT_SECRET = 6  # characters
_PGPASS_LINE = re.compile(r"(?:(?:\\.|[^:\\])*:){3}((?:\\.|[^:\\])*):(.*)")  # 4th field: user
_PLACEHOLDER = "stuckrunshiddenvalue"  # rendered, then replaced: SQLAlchemy would encode *** as %2A%2A%2A


def application_name(role: str) -> str:
    return f"stuck-runs {role} {socket.gethostname()}:{os.getpid()}"[:63]


# An execution option: SQL sent ahead of the statement, in the same query string (one round trip). On
# a connection in autocommit the string's statements are one transaction (PostgreSQL's implicit
# block of a multi-statement query), each with a snapshot of its own; the driver returns the last
# one's rows, so the statement's results are read as usual.
PRECEDED_BY = "stuck_runs_preceded_by"


def _preceded(conn, cursor, statement, parameters, context, executemany):
    before = context.execution_options.get(PRECEDED_BY) if context is not None else None
    return (f"{before}; {statement}" if before else statement), parameters


def make_engine(url: str, *, role: str = "cli", pool_size: int = 5, statement_timeout_ms: int | None = None) -> Engine:
    """An engine for `url` whose connections are UTC and named; nothing is connected yet.

    `statement_timeout_ms` bounds every statement of the engine's sessions (lock waits included)."""
    options = "-c TimeZone=UTC" + (f" -c statement_timeout={statement_timeout_ms}" if statement_timeout_ms else "")
    engine = create_engine(
        url,
        pool_pre_ping=True,
        pool_size=pool_size,
        max_overflow=pool_size,
        connect_args={
            "connect_timeout": CONNECT_TIMEOUT_SECONDS,
            "application_name": application_name(role),
            "options": options,
        },
    )
    event.listen(engine, "before_cursor_execute", _preceded, retval=True)
    return engine


def _parsed(url: str | URL | None) -> URL | None:
    try:
        return make_url(url) if url else None
    except (ArgumentError, ValueError):
        return None


def redacted(url: str | URL | None) -> str:
    """`url` as it may be shown: no password, whether written `user:secret@` or `?password=secret`.

    A host or database holding an '@' is the tail of a password whose '@' was not encoded: hidden too.
    """
    if not url:
        return ""
    parsed = _parsed(url)
    if parsed is None:
        return "(a database URL that cannot be read)"
    query = {key: _PLACEHOLDER if key.lower() in SECRET_PARAMETERS else value for key, value in parsed.query.items()}
    host, database = (_PLACEHOLDER if part and "@" in part else part for part in (parsed.host, parsed.database))
    shown = parsed.set(host=host, database=database, query=query)
    return shown.render_as_string(hide_password=True).replace(_PLACEHOLDER, HIDDEN)


def connection_secrets(url: str | URL | None, environ: Mapping[str, str] | None = None) -> set[str]:
    """Every secret a connection to `url` may use: the URL's own, PGPASSWORD, and the passwords of its
    service (pg_service.conf) and of the password file (.pgpass) for its user."""
    environ = os.environ if environ is None else environ
    parsed = _parsed(url)
    query = dict(parsed.query) if parsed is not None else {}
    found = {environ.get("PGPASSWORD", ""), parsed.password if parsed is not None else ""}
    for key, value in query.items():
        if key.lower() in SECRET_PARAMETERS:
            found.update((value,) if isinstance(value, str) else value)
    service = query.get("service") or environ.get("PGSERVICE")
    if isinstance(service, str) and service:
        found |= _service_passwords(service, environ)
    user = (parsed.username if parsed is not None else None) or query.get("user") or environ.get("PGUSER")
    passfile = query.get("passfile") or environ.get("PGPASSFILE") or _home() / ".pgpass"
    found |= _pgpass_passwords(Path(str(passfile)), str(user) if user else _login())
    return {str(secret) for secret in found if secret}


def _home() -> Path:
    try:
        return Path.home()
    except RuntimeError:  # no HOME and no passwd entry: libpq finds no file there either
        return Path("/nonexistent")


def _login() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return ""


def _lines(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8", errors="replace").splitlines()
    except (OSError, ValueError):
        return []


def _service_passwords(service: str, environ: Mapping[str, str]) -> set[str]:
    files = [Path(environ.get("PGSERVICEFILE") or _home() / ".pg_service.conf")]
    if environ.get("PGSYSCONFDIR"):
        files.append(Path(environ["PGSYSCONFDIR"]) / "pg_service.conf")
    found, section = set(), None
    for line in (line.strip() for path in files for line in _lines(path)):
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1].strip()
        elif section == service and "=" in line:
            key, _, value = line.partition("=")
            if key.strip() in SECRET_PARAMETERS:
                found.add(value.strip())
    return found


def _pgpass_passwords(path: Path, user: str) -> set[str]:
    """The password of every `host:port:database:user:password` line for `user` (or `*`)."""
    matches = (_PGPASS_LINE.fullmatch(line) for line in _lines(path) if not line.startswith("#"))
    return {_unescape(m[2]) for m in matches if m and _unescape(m[1]) in ("*", user)}


def _unescape(field: str) -> str:
    return re.sub(r"\\(.)", r"\1", field)


def scrub(text: str, url: str | URL | None, environ: Mapping[str, str] | None = None) -> str:
    """`text` with every secret of `url` (see `connection_secrets`) replaced by ***, as written or URL-encoded.

    A short secret goes only where it stands as a word: a password `p` must not eat the p of "port".
    """
    forms = {
        form
        for secret in connection_secrets(url, environ)
        for form in (secret, quote(secret, safe=""), quote_plus(secret))
    }
    for form in sorted(forms, key=len, reverse=True):
        pattern = re.escape(form) if len(form) >= SHORT_SECRET else rf"(?<!\w){re.escape(form)}(?!\w)"
        text = re.sub(pattern, lambda _: HIDDEN, text)
    return text


def describe_db_error(exc: BaseException, url: str | URL | None) -> str:
    """One line for a driver error: its first line, never a secret or the SQL."""
    original = getattr(exc, "orig", None) or exc
    first = (str(original).strip().splitlines() or [type(original).__name__])[0]
    return scrub(first, url)


@contextmanager
def database_errors(engine: Engine, doing: str) -> Iterator[None]:
    """Turns connection failures into `DatabaseUnavailable` naming what was being done."""
    try:
        yield
    except (OperationalError, InterfaceError) as exc:
        where, reason = redacted(engine.url), describe_db_error(exc, engine.url)
        raise DatabaseUnavailable(
            f"database error while {doing} at {where}: {reason}", f"database error while {doing}: {reason}"
        ) from None
