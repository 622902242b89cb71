"""Settings from the environment, `.env` and flags: the one reader of the environment.

`.env` (current directory upwards) is read, never loaded: nothing here writes `os.environ`.
Real environment variables win over `.env`, flags win over both. The values `.env` gave travel
in `Settings.dotenv` to the scrapers the executors start, which receive them under the real
environment, as when `.env` was loaded into this process.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from db.errors import ConfigError
from jobs.patterns import KNOWN_PATTERNS
from jobs.settings.declarations import DECLARED, Settings, settings_from
from jobs.settings.parsers import shown


def load_settings(
    env: Mapping[str, str], flags: Mapping[str, object] | None = None, *, dotenv: Mapping[str, str] | None = None
) -> Settings:
    """Settings from `env` (the process environment with `.env` folded in), `flags` winning.

    `flags` maps environment-variable names to the values given on the command line (None or
    absent: not given). Empty environment values count as unset. No error repeats a secret of
    the DATABASE_URL (a command template may well contain it). `dotenv`: `.env`'s own values,
    kept for the scrapers.
    """
    values: dict[str, object] = {}  # by Setting.field
    names: dict[str, str] = {}  # the variable or flag each setting came from, for error lines
    file_permanent = None
    try:
        for setting in DECLARED:
            given = (flags or {}).get(setting.env)
            if given is not None:
                names[setting.env], text = setting.flag, given
            elif env.get(setting.env, "").strip():
                names[setting.env], text = setting.env, env[setting.env]
            else:
                continue
            name = names[setting.env]
            value = setting.parse(_plain_text(text, name, setting.secret), name) if isinstance(text, str) else text
            if setting.env == "FAILURE_PATTERNS_FILE":  # its patterns, and the permanent ones it may name
                value, file_permanent = value  # type: ignore[misc]
            values[setting.field] = value
        if file_permanent is not None:
            values.setdefault("policy.permanent_patterns", file_permanent)
        settings = settings_from(values, dotenv)
        _check_consistency(settings, names)
    except ConfigError as exc:
        from db.engine import scrub

        raise ConfigError(scrub(str(exc), values.get("database_url"), env)) from None  # type: ignore[arg-type]
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
            ("SCRAPYD_URL", settings.scrapyd_url),
            ("CELERY_BROKER_URL", settings.celery_broker_url),
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
    _check_scrapyd(settings, names)
    _check_celery(settings, names)
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


def _check_scrapyd(settings: Settings, names: Mapping[str, str]) -> None:
    """SCRAPYD_URL needs its project and spider; the other SCRAPYD_ settings need SCRAPYD_URL."""
    name = lambda env: names.get(env, env)  # noqa: E731
    url = settings.scrapyd_url
    if not url:
        given = [env for env, value in _scrapyd_parts(settings) if value]
        if given:
            raise ConfigError(
                f"{name(given[0])} is set but SCRAPYD_URL is not: set Scrapyd's URL, or unset {name(given[0])}"
            )
        return
    for env, value in _scrapyd_parts(settings)[:2]:
        if not value:
            raise ConfigError(f"SCRAPYD_URL is set but {env} is not: set {env} (the spider's project and name)")
    if (settings.scrapyd_username or settings.scrapyd_password) and (url.username or url.password):
        raise ConfigError(
            f"{name('SCRAPYD_URL')} holds credentials and SCRAPYD_USERNAME/SCRAPYD_PASSWORD are set too: keep one"
        )
    if bool(settings.scrapyd_username) != bool(settings.scrapyd_password):
        missing = "SCRAPYD_PASSWORD" if settings.scrapyd_username else "SCRAPYD_USERNAME"
        raise ConfigError(
            f"{missing} is not set: Scrapyd's basic auth takes both SCRAPYD_USERNAME and SCRAPYD_PASSWORD"
        )


def _scrapyd_parts(settings: Settings) -> list[tuple[str, object]]:
    return [
        ("SCRAPYD_PROJECT", settings.scrapyd_project),
        ("SCRAPYD_SPIDER", settings.scrapyd_spider),
        ("SCRAPYD_ARGS", settings.scrapyd_args),
        ("SCRAPYD_USERNAME", settings.scrapyd_username),
        ("SCRAPYD_PASSWORD", settings.scrapyd_password),
    ]


def _check_celery(settings: Settings, names: Mapping[str, str]) -> None:
    """CELERY_TASK and CELERY_QUEUE say where a broker's tasks go: meaningless without the broker,
    and a broker without a task name sends nothing."""
    named = {env: names.get(env, env) for env in ("CELERY_BROKER_URL", "CELERY_TASK", "CELERY_QUEUE")}
    if not settings.celery_broker_url:
        for env, value in (("CELERY_TASK", settings.celery_task), ("CELERY_QUEUE", settings.celery_queue)):
            if value:
                raise ConfigError(
                    f"{named[env]} is set but CELERY_BROKER_URL is not: set the broker (redis://host:6379/0), "
                    f"or unset {named[env]}"
                )
    elif not settings.celery_task:
        raise ConfigError(
            f"{named['CELERY_BROKER_URL']} is set but CELERY_TASK is not: name the task that scrapes a run "
            "(e.g. CELERY_TASK=scraper.tasks.scrape)"
        )


def settings_from_environment(flags: Mapping[str, object] | None = None) -> Settings:
    """Settings from the process environment, `.env` (current directory upwards) and `flags`.

    Real environment variables win over `.env`; flags win over both.
    """
    dotenv = read_dotenv()
    return load_settings({**dotenv, **os.environ}, flags, dotenv=dotenv)


def environment_with_dotenv() -> dict[str, str]:
    """The process environment with `.env` under it, as `settings_from_environment` sees it."""
    return {**read_dotenv(), **os.environ}


# What python-dotenv's load_dotenv honours: the switch that turns `.env` off.
_DISABLED = {"1", "true", "t", "yes", "y"}


def _any_dotenv() -> bool:
    """Whether anything is named `.env` in the current directory or above: where nothing is, there is
    nothing to read, and python-dotenv (~4 ms of every command's start) is not loaded to say so. Where
    something is, python-dotenv's own `find_dotenv` decides whether it is the file."""
    here = os.path.abspath(os.getcwd())
    while True:
        if os.path.lexists(os.path.join(here, ".env")):
            return True
        parent = os.path.dirname(here)
        if parent == here:
            return False
        here = parent


def read_dotenv() -> dict[str, str]:
    """`.env`'s values (current directory upwards), as `load_dotenv(override=False)` would have set
    them; checked first for what would be a traceback (not UTF-8, a NUL byte), even when
    PYTHON_DOTENV_DISABLED turns the file off."""
    if not _any_dotenv():
        return {}
    from dotenv import find_dotenv
    from dotenv.main import DotEnv

    path = find_dotenv(usecwd=True)
    if not path:
        return {}
    # Not `dotenv_values`: its `${VAR}` interpolation lets the file's earlier values win over the
    # real environment; load_dotenv(override=False) let the environment win, and still does here.
    try:
        values = DotEnv(path, interpolate=True, override=False, encoding="utf-8").dict()
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path} is not UTF-8 text (a byte at offset {exc.start}): save it as UTF-8") from None
    for name, value in values.items():
        if "\x00" in name + (value or ""):
            raise ConfigError(f"{shown(name)} in {path} holds a NUL byte: no setting accepts one")
    if os.environ.get("PYTHON_DOTENV_DISABLED", "").casefold() in _DISABLED:
        return {}
    return {name: value for name, value in values.items() if value is not None}
