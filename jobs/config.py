"""Configuration: read once from the environment (and `.env`), overridden by flags, validated.

Every value is checked before the database is touched; a bad one raises `ConfigError` with one
line naming the variable (or flag), the value and what is accepted. The result is a frozen
`Settings` passed down; nothing below reads `os.environ`.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shlex
import string
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import timedelta

from dotenv import dotenv_values, find_dotenv, load_dotenv

from db.errors import ConfigError
from db.layout import Layout, parse_column_map, parse_run_label, parse_status_map
from jobs.patterns import DEFAULT_PERMANENT, KNOWN_PATTERNS, PATTERNS_FILE_SHAPE, patterns_from_json
from jobs.rules import RetryPolicy

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


@dataclass(frozen=True)
class Settings:
    """Everything stuck-runs is configured with, validated."""

    database_url: str | None = None
    policy: RetryPolicy = field(default_factory=RetryPolicy)
    check_interval: timedelta = timedelta(hours=1)
    process_interval: timedelta = timedelta(minutes=30)
    dispatch_poll: timedelta = timedelta(seconds=5)
    max_concurrent_retries: int = 1
    execution_timeout: timedelta | None = None  # None: the stuck threshold
    batch_size: int = 1000
    heartbeat_column: str | None = None
    table: str = "scrape_runs"
    log_level: str = "INFO"
    log_format: str = "text"
    metrics_port: int | None = None
    failure_patterns: tuple[tuple[str, str], ...] = ()  # custom (name, regex), tried first
    command: tuple[str, ...] | None = None
    callable_path: str | None = None
    webhook: str | None = None  # SPEC §12: due retries POSTed to this URL template
    webhook_secret: str | None = field(default=None, repr=False)
    webhook_timeout: timedelta = timedelta(seconds=30)
    handoff: str | None = None  # SPEC §12: due retries flipped to this state (queued) for the fleet
    layout: Layout = field(default_factory=Layout)
    admin_host: str = "127.0.0.1"
    admin_port: int = 8080
    admin_token: str | None = field(default=None, repr=False)
    read_token: str | None = field(default=None, repr=False)

    @property
    def hands_off(self) -> str | None:
        """How due retries leave for the fleet (`webhook`, `queue`), or None when they run here."""
        return "webhook" if self.webhook else ("queue" if self.handoff else None)

    @property
    def timeout(self) -> timedelta:
        return self.execution_timeout or self.policy.stuck_after

    def require_database_url(self) -> str:
        if not self.database_url:
            raise ConfigError(
                "DATABASE_URL is not set: put DATABASE_URL=postgresql://user:password@host/dbname "
                "in the environment or in .env"
            )
        return self.database_url

    def with_policy(self, **changes: object) -> Settings:
        return replace(self, policy=replace(self.policy, **changes))


# (environment variable, flag, parser, Settings or RetryPolicy field)
_Parser = Callable[[str, str], object]
_FIELDS: tuple[tuple[str, str, _Parser, str], ...] = (
    ("DATABASE_URL", "--database-url", parse_database_url, "database_url"),
    ("STUCK_AFTER", "--stuck-after", parse_duration, "policy.stuck_after"),
    ("RETRY_DELAY", "--retry-delay", lambda t, n: parse_duration(t, n, allow_zero=True), "policy.retry_delay"),
    ("MAX_RETRIES", "--max-retries", lambda t, n: parse_int(t, n, minimum=0, maximum=1000), "policy.max_retries"),
    ("RETRY_BACKOFF", "--retry-backoff", lambda t, n: parse_choice(t, n, ("fixed", "exponential")), "policy.backoff"),
    ("RETRY_MAX_DELAY", "--retry-max-delay", parse_duration, "policy.max_delay"),
    ("RETRY_JITTER", "--retry-jitter", parse_fraction, "policy.jitter"),
    ("FAILURE_PATTERNS_FILE", "--failure-patterns-file", parse_patterns_file, "failure_patterns_file"),
    ("PERMANENT_PATTERNS", "--permanent-patterns", parse_patterns, "policy.permanent_patterns"),
    ("CHECK_INTERVAL", "--check-interval", parse_duration, "check_interval"),
    ("PROCESS_INTERVAL", "--process-interval", parse_duration, "process_interval"),
    ("DISPATCH_POLL", "--dispatch-poll", parse_duration, "dispatch_poll"),
    (
        "MAX_CONCURRENT_RETRIES",
        "--max-concurrent-retries",
        lambda t, n: parse_int(t, n, minimum=1, maximum=256),
        "max_concurrent_retries",
    ),
    ("EXECUTION_TIMEOUT", "--execution-timeout", parse_duration, "execution_timeout"),
    ("BATCH_SIZE", "--batch-size", lambda t, n: parse_int(t, n, minimum=1, maximum=100_000), "batch_size"),
    ("HEARTBEAT_COLUMN", "--heartbeat-column", parse_identifier, "heartbeat_column"),
    ("SCRAPE_RUNS_TABLE", "--table", lambda t, n: parse_identifier(t, n, qualified=True), "table"),
    ("LOG_LEVEL", "--log-level", lambda t, n: parse_choice(t, n, LOG_LEVELS, upper=True), "log_level"),
    ("LOG_FORMAT", "--log-format", lambda t, n: parse_choice(t, n, ("text", "json")), "log_format"),
    ("METRICS_PORT", "--metrics-port", lambda t, n: parse_int(t, n, minimum=1, maximum=65535), "metrics_port"),
    ("COLUMN_MAP", "--column-map", parse_column_map, "layout.columns"),
    ("STATUS_MAP", "--status-map", parse_status_map, "layout.statuses"),
    ("RUN_LABEL", "--run-label", parse_run_label, "layout.label"),
    ("SCRAPE_RUN_COMMAND", "--command", parse_command, "command"),
    ("SCRAPE_RUN_CALLABLE", "--callable", parse_callable, "callable_path"),
    ("SCRAPE_RUN_WEBHOOK", "--webhook", parse_webhook, "webhook"),
    ("WEBHOOK_SECRET", "--webhook-secret", parse_token, "webhook_secret"),
    ("WEBHOOK_TIMEOUT", "--webhook-timeout", lambda t, n: parse_webhook_timeout(t, n), "webhook_timeout"),
    ("SCRAPE_RUN_HANDOFF", "--handoff", parse_handoff, "handoff"),
    ("ADMIN_HOST", "--host", parse_host, "admin_host"),
    ("ADMIN_PORT", "--port", lambda t, n: parse_int(t, n, minimum=1, maximum=65535), "admin_port"),
    # Tokens have flags for completeness only: `serve` takes them from the environment, not argv,
    # where `ps` would show them.
    ("ADMIN_TOKEN", "--admin-token", parse_token, "admin_token"),
    ("READ_TOKEN", "--read-token", parse_token, "read_token"),
)
SECRETS = frozenset({"DATABASE_URL", "ADMIN_TOKEN", "READ_TOKEN", "WEBHOOK_SECRET"})
ENV_VARS = tuple(env for env, _, _, _ in _FIELDS)
FLAG_FOR = {env: flag for env, flag, _, _ in _FIELDS}


def load_settings(env: Mapping[str, str], flags: Mapping[str, object] | None = None) -> Settings:
    """Settings from `env` (the process environment with `.env` folded in), `flags` winning.

    `flags` maps environment-variable names to the values given on the command line (None or
    absent: not given). Empty environment values count as unset. No error repeats a secret of
    the DATABASE_URL (a command template may well contain it).
    """
    top: dict[str, object] = {}
    policy: dict[str, object] = {}
    layout: dict[str, object] = {}
    names: dict[str, str] = {}  # the variable or flag each setting came from, for error lines
    file_permanent = None
    try:
        for env_name, flag, parse, target in _FIELDS:
            given = (flags or {}).get(env_name)
            if given is not None:
                names[env_name], text = flag, given
            elif env.get(env_name, "").strip():
                names[env_name], text = env_name, env[env_name]
            else:
                continue
            name = names[env_name]
            value = parse(_plain_text(text, name, env_name in SECRETS), name) if isinstance(text, str) else text
            if target == "failure_patterns_file":
                top["failure_patterns"], file_permanent = value  # type: ignore[misc]
            elif target.startswith("policy."):
                policy[target.removeprefix("policy.")] = value
            elif target.startswith("layout."):
                layout[target.removeprefix("layout.")] = value
            else:
                top[target] = value
        policy.setdefault("permanent_patterns", DEFAULT_PERMANENT if file_permanent is None else file_permanent)
        settings = Settings(policy=RetryPolicy(**policy), layout=Layout(**layout), **top)  # type: ignore[arg-type]
        _check_consistency(settings, names)
    except ConfigError as exc:
        from db.engine import scrub

        raise ConfigError(scrub(str(exc), top.get("database_url"), env)) from None  # type: ignore[arg-type]
    return settings


def _plain_text(text: str, name: str, secret: bool) -> str:
    """No setting takes a NUL byte or bytes that are not UTF-8: open(), exec and the driver refuse them."""
    value = "" if secret else f"={shown(text)}"
    if "\x00" in text:
        raise ConfigError(f"{name}{value} holds a NUL byte: no setting accepts one")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ConfigError(f"{name}{value} is not UTF-8 text: write it in UTF-8") from None
    return text


def _check_consistency(settings: Settings, names: Mapping[str, str]) -> None:
    known = KNOWN_PATTERNS | {name for name, _ in settings.failure_patterns}
    unknown = sorted(settings.policy.permanent_patterns - known)
    if unknown:  # a file's own `permanent` list was checked with the file
        raise ConfigError(
            f"{names.get('PERMANENT_PATTERNS', 'PERMANENT_PATTERNS')}: unknown failure pattern {shown(unknown[0])}; "
            f"use some of {', '.join(sorted(known))}"
        )
    executors = [
        env
        for env, value in (
            ("SCRAPE_RUN_COMMAND", settings.command),
            ("SCRAPE_RUN_CALLABLE", settings.callable_path),
            ("SCRAPE_RUN_WEBHOOK", settings.webhook),
            ("SCRAPE_RUN_HANDOFF", settings.handoff),
        )
        if value
    ]
    if len(executors) > 1:
        raise ConfigError(
            f"{' and '.join(names.get(e, e) for e in executors)} are all set: keep the one way your retries run"
            if len(executors) > 2
            else f"{names.get(executors[0], executors[0])} and {names.get(executors[1], executors[1])} are both set: "
            "keep the one way your retries run"
        )
    if settings.handoff and settings.handoff not in settings.layout.statuses:
        raise ConfigError(
            f"{names.get('SCRAPE_RUN_HANDOFF', 'SCRAPE_RUN_HANDOFF')}={settings.handoff} but STATUS_MAP does not map "
            f"{settings.handoff}: add {settings.handoff}=<the value your workers pick runs up by> to STATUS_MAP"
        )
    if settings.webhook_secret and not settings.webhook:
        raise ConfigError("WEBHOOK_SECRET is set but SCRAPE_RUN_WEBHOOK is not: set the webhook, or unset the secret")
    if settings.admin_token and settings.admin_token == settings.read_token:
        raise ConfigError("ADMIN_TOKEN and READ_TOKEN are the same: give the read-only token a value of its own")
    policy = settings.policy
    if policy.backoff == "exponential" and policy.max_delay < policy.retry_delay:
        raise ConfigError(
            f"RETRY_MAX_DELAY ({policy.max_delay}) is shorter than RETRY_DELAY ({policy.retry_delay}): "
            "raise RETRY_MAX_DELAY or lower RETRY_DELAY"
        )


def settings_from_environment(flags: Mapping[str, object] | None = None) -> Settings:
    """Settings from the process environment, `.env` (current directory upwards) and `flags`.

    Real environment variables win over `.env`; flags win over both.
    """
    path = find_dotenv(usecwd=True)
    if path:
        _check_dotenv(path)
        load_dotenv(path, override=False, encoding="utf-8")
    return load_settings(os.environ, flags)


def environment_with_dotenv() -> dict[str, str]:
    """The process environment with `.env` (current directory upwards) under it, as
    `settings_from_environment` sees it, but without loading `.env` into `os.environ`."""
    path = find_dotenv(usecwd=True)
    from_file = _check_dotenv(path) if path else {}
    return {**{name: value for name, value in from_file.items() if value is not None}, **os.environ}


def _check_dotenv(path: str) -> dict[str, str | None]:
    """What `load_dotenv` would turn into a traceback: a file that is not UTF-8, a NUL byte."""
    try:
        values = dotenv_values(path, encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path} is not UTF-8 text (a byte at offset {exc.start}): save it as UTF-8") from None
    for name, value in values.items():
        if "\x00" in name + (value or ""):
            raise ConfigError(f"{shown(name)} in {path} holds a NUL byte: no setting accepts one")
    return values
