"""`stuck-runs doctor`: every precondition checked, one line each, with the fix."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

import sqlalchemy as sa

from db import catalog
from db.engine import database_errors, make_engine, redacted
from db.errors import ConfigError, OperatorError
from db.layout import STATES, WRITTEN_STATES
from db.migrate import current_revision, head_revision, stale_indexes
from db.migration_plan import plan_for
from db.queries import RunQueries
from db.queries.groups import target_key
from db.reflect import ROLE_KEYS, sql_type
from db.shape import heartbeat_problem
from db.table import RunsTable, load_runs_table
from jobs.doctor_limits import limit_findings
from jobs.executors.callable import resolve_callable
from jobs.executors.celery import CeleryExecutor, credentials_refused, refused_login
from jobs.runtime import check_placeholders
from jobs.settings import DECLARED, Settings
from jobs.status import untimed_message

CLOCK_SKEW_LIMIT = timedelta(seconds=5)  # a minute of skew misjudges stuck runs by a minute


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    fix: str | None = None
    warning: bool = False  # true: worth knowing, not a failure


def run_checks(load_settings: Callable[[], Settings], now: Callable[[], datetime]) -> list[Check]:
    """Runs the checks in order; those that need what an earlier one found missing are skipped."""
    checks: list[Check] = []
    try:
        settings = load_settings()
    except ConfigError as exc:
        return [Check("configuration", False, str(exc), "correct the value named above")]
    listed = ", ".join(setting.doctor.format(setting.of(settings)) for setting in DECLARED if setting.doctor)
    checks.append(Check("configuration", True, listed))
    checks.append(_executor(settings))
    if settings.alert_urls:
        checks.append(_notifications(settings))
    if not settings.database_url:
        checks.append(Check("connectivity", False, "DATABASE_URL is not set", "set DATABASE_URL=postgresql://..."))
        return checks
    engine = make_engine(settings.database_url, role="doctor", pool_size=1)
    try:
        checks.extend(_database_checks(engine, settings, now))
    finally:
        engine.dispose()
    return checks


def _notifications(settings: Settings) -> Check:
    """Each ALERT_URLS URL by its service, secrets masked (`stuck-runs alert test` sends to them)."""
    urls = ", ".join(f"{url.service} ({url.shown})" for url in settings.alert_urls)
    return Check("notifications", True, f"{urls}; events {', '.join(sorted(settings.alert_events))}")


def _executor(settings: Settings) -> Check:
    if settings.command:
        program = settings.command[0]
        found = shutil.which(program)
        if found is None:
            return Check(
                "executor",
                False,
                f"SCRAPE_RUN_COMMAND: {program!r} is not found or not executable",
                "give the full path, or fix PATH for the daemon",
            )
        return Check("executor", True, f"command {found}")
    if settings.callable_path:
        try:
            resolve_callable(settings.callable_path)
        except OperatorError as exc:
            return Check("executor", False, str(exc), "install the scraper package in this environment")
        return Check("executor", True, f"callable {settings.callable_path}")
    if settings.webhook:
        return _webhook(settings.webhook)
    if settings.scrapyd_url:
        return _scrapyd(settings)
    if settings.handoff:
        return Check("executor", True, f"hand-off: due retries become {settings.layout.written('queued')!r}")
    if settings.celery_broker_url:
        return _celery(settings)
    return Check(
        "executor",
        False,
        "no executor configured: retries cannot run",
        "set SCRAPE_RUN_COMMAND, SCRAPE_RUN_CALLABLE, SCRAPE_RUN_WEBHOOK, SCRAPE_RUN_HANDOFF or SCRAPYD_URL",
    )


def _scrapyd(settings: Settings) -> Check:
    """Scrapyd answers daemonstatus.json and has the project and the spider (SPEC §16)."""
    from jobs.executors.scrapyd import ScrapydExecutor  # httpx only where it is used

    executor = ScrapydExecutor.from_settings(settings)
    try:
        ok, detail, fix = executor.health()
    finally:
        executor.close()
    return Check("executor", ok, detail, fix)


def _celery(settings: Settings) -> Check:
    """That Celery is installed and the broker answers (SPEC §16)."""
    try:
        executor = CeleryExecutor(settings.celery_broker_url, settings.celery_task, settings.celery_queue)
    except OperatorError as exc:
        return Check("executor", False, str(exc), "install the extra, or unset CELERY_BROKER_URL")
    try:
        return Check("executor", True, executor.check())
    except Exception as exc:  # noqa: BLE001 - whatever the transport raised: the broker does not answer
        if refused_login(exc):
            return Check(
                "executor",
                False,
                credentials_refused(executor.broker),
                "fix CELERY_BROKER_URL: due retries stay pending, untouched, until the broker takes it",
            )
        return Check(
            "executor",
            False,
            f"Celery broker {executor.broker} does not answer ({type(exc).__name__})",
            "start the broker or fix CELERY_BROKER_URL: due retries wait (postponed) until it answers",
        )
    finally:
        executor.close()


WEBHOOK_PROBE_TIMEOUT = 5.0


def _webhook(template: str) -> Check:
    """The receiver's host resolves (a failure), and it answers an OPTIONS at its root (a warning:
    it may be down for now, and doctor never POSTs a retry)."""
    import socket
    import ssl
    from urllib.parse import urlsplit

    import httpx

    parts = urlsplit(template)
    host, port = parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        return Check(
            "executor", False, f"SCRAPE_RUN_WEBHOOK: host {host!r} does not resolve ({exc})", "fix the webhook's host"
        )
    root = f"{parts.scheme}://{parts.netloc}/"
    try:
        answer = httpx.options(
            root,
            timeout=WEBHOOK_PROBE_TIMEOUT,
            follow_redirects=False,
            trust_env=False,
            verify=ssl.create_default_context(),  # as deliveries verify
        )
    except httpx.ConnectError as exc:
        if "CERTIFICATE_VERIFY_FAILED" in str(exc):
            return Check(
                "executor",
                False,
                f"webhook {root}: its TLS certificate is not trusted here",
                "install its CA in the system's trust store, or point SSL_CERT_FILE at it",
            )
        return _unanswered(root, exc)
    except httpx.HTTPError as exc:
        return _unanswered(root, exc)
    return Check("executor", True, f"webhook {root} answers (HTTP {answer.status_code} to OPTIONS)")


def _unanswered(root: str, exc: Exception) -> Check:
    return Check(
        "executor",
        True,
        f"webhook {root} does not answer ({type(exc).__name__}): deliveries wait until it does",
        "start the receiver, or check the port, the scheme (http or https) and the firewall",
        warning=True,
    )


def _database_checks(engine: sa.Engine, settings: Settings, now: Callable[[], datetime]) -> list[Check]:
    checks = []
    try:
        with database_errors(engine, "connecting"), engine.connect() as conn:
            version_num, version, user, db_now = catalog.server(conn)
    except OperatorError as exc:
        return [Check("connectivity", False, str(exc), "check host, port, credentials and network")]
    checks.append(Check("connectivity", True, f"PostgreSQL {version} at {redacted(engine.url)} as {user}"))
    if version_num < catalog.MIN_SERVER_VERSION:
        checks.append(Check("server version", False, f"PostgreSQL {version} is older than 13", "upgrade PostgreSQL"))
    skew = now() - db_now.astimezone(timezone.utc)
    checks.append(
        Check(
            "clock skew",
            abs(skew) <= CLOCK_SKEW_LIMIT,
            f"host is {skew.total_seconds():+.1f}s from the database",
            None
            if abs(skew) <= CLOCK_SKEW_LIMIT
            else "synchronise the host's clock (NTP): stuck ages are computed on it",
        )
    )
    with engine.connect() as conn:
        try:
            runs = load_runs_table(conn, settings.table, layout=settings.layout)
            current = current_revision(conn, settings.table)
        except OperatorError as exc:
            checks.append(Check("table", False, str(exc), None))
            return checks
        if settings.heartbeat_column:
            problem = heartbeat_problem(runs.table, settings.table, settings.heartbeat_column)
            checks.append(
                Check("heartbeat", problem is None, problem or f"progress read from {settings.heartbeat_column}")
            )
            if problem is None:
                runs = load_runs_table(conn, settings.table, settings.heartbeat_column, settings.layout)
        checks.append(Check("mapping", True, describe_mapping(runs)))
        try:
            check_placeholders(settings, runs)
        except ConfigError as exc:
            fix = f"fix {str(exc).split(':', 1)[0]}"  # the setting the line names
            checks.append(Check("executor placeholders", False, str(exc), fix))
        if settings.handoff:  # a value the column refuses was refused with the table, above
            value = runs.layout.written(settings.handoff)
            checks.append(Check("hand-off", True, f"{runs.name_of('status')} takes {value!r} ({settings.handoff})"))
        if settings.target:  # what every other command refuses at its start, named with the fix
            try:
                target_key(runs, settings.target)
                checks.append(Check("target", True, f"stats --by target groups runs by {settings.target}"))
            except ConfigError as exc:
                checks.append(Check("target", False, str(exc), "set TARGET to a text column, or host(URL_COLUMN)"))
        unmapped = _unmapped_values(conn, runs)
        if unmapped:
            checks.append(unmapped)
        zone = catalog.scrapers_time_zone(settings.database_url)
        naive = catalog.naive_columns_off_utc(zone, runs.table, _timestamps(runs))
        if naive:
            names = ", ".join(runs.name_of(key) for key in naive)
            checks.append(
                Check(
                    "time zone",
                    True,
                    f"the server's TimeZone is {zone} and {names} hold(s) timestamps without time zone, "
                    "which stuck-runs reads as UTC",
                    "have the scraper write UTC there (ALTER ROLE … SET TimeZone = 'UTC'), or use timestamptz",
                    warning=True,
                )
            )
        head = head_revision()
        checks.append(
            Check(
                "migration",
                current == head,
                f"{settings.table} at revision {current}, newest {head}",
                None if current == head else "run `stuck-runs migrate`",
            )
        )
        states = catalog.index_state(conn, settings.table)
        bad = [f"{name} ({'invalid' if state is False else 'missing'})" for name, state in states.items() if not state]
        bad += [f"{name} (built for another mapping)" for name in stale_indexes(conn, plan_for(conn, runs.reflected))]
        checks.append(
            Check(
                "indexes",
                not bad,
                ", ".join(bad) if bad else f"{len(states)} indexes present and valid",
                "run `stuck-runs migrate` (it rebuilds invalid ones)" if bad else None,
            )
        )
        if current == head:
            checks.append(_untimed(conn, RunQueries(runs), settings.table))
            checks.extend(Check(*finding) for finding in limit_findings(conn, settings, runs))
        lacking = catalog.missing_privileges(conn, settings.table, runs.dead_letters_name, runs.id_sequence)
        checks.append(
            Check(
                "privileges",
                not lacking,
                ", ".join(lacking) if lacking else "SELECT, INSERT, UPDATE where needed",
                f"GRANT them to {catalog.server(conn)[2]}" if lacking else None,
            )
        )
    return checks


def _untimed(conn: sa.Connection, queries: RunQueries, table: str) -> Check:
    count = conn.execute(sa.select(sa.func.count()).select_from(queries.t).where(queries.untimed())).scalar_one()
    if not count:
        return Check("untimed runs", True, "every running run has a started_at")
    return Check(
        "untimed runs",
        False,
        untimed_message(count),
        f"have the scraper set {queries.runs.name_of('started_at')} when a run starts; for these: "
        + queries.untimed_fix_sql(),
    )


STATUS_SAMPLE = 10_000


def _unmapped_values(conn: sa.Connection, runs: RunsTable) -> Check | None:
    """A warning when the table holds status values STATUS_MAP does not mention: a running value
    left out would make its stuck runs invisible, silently."""
    known = {value for state in STATES for value in runs.layout.values(state)}
    found = conn.execute(RunQueries(runs).status_sample(), {"sr_limit": STATUS_SAMPLE}).all()
    sampled = sum(count for _, count in found)
    unknown = [(value, count) for value, count in found if value not in known]
    if not unknown:
        return None
    listed = ", ".join(f"{value!r} ({count:,})" for value, count in unknown[:5])
    return Check(
        "status values",
        True,
        f"of {sampled:,} rows sampled, some hold values STATUS_MAP does not map: {listed}; stuck-runs leaves "
        "such runs alone",
        "if one means running, completed or failed, add it to STATUS_MAP (running=a|b takes several)",
        warning=True,
    )


def _timestamps(runs: RunsTable) -> list[str]:
    keys = ["started_at", "completed_at", *([runs.heartbeat] if runs.heartbeat else [])]
    return [key for key in keys if key in runs.c]


def describe_mapping(runs: RunsTable) -> str:
    """The table as stuck-runs adopted it: each role's column and type, each state's values, the label."""
    layout = runs.layout

    def kind(role: str) -> str:
        return runs.status_type.sql_name if role == "status" and runs.status_is_enum else sql_type(runs.c[role])

    roles = ", ".join(f"{role}={runs.name_of(role)} ({kind(role)})" for role in ROLE_KEYS)
    if runs.updated:  # set to now on every write stuck-runs makes
        roles += f", updated_at={runs.name_of(runs.updated)} ({sql_type(runs.c[runs.updated])})"
    shown = (*WRITTEN_STATES, *(("queued",) if "queued" in layout.statuses else ()))
    states = ", ".join(f"{state}={'|'.join(layout.values(state))}" for state in shown)
    label = layout.label or "default: {search_query} in {location_query}, else the run's id"
    return f"{roles}; status values {states}; label {label}; {len(runs.input_columns)} input column(s) copied"
