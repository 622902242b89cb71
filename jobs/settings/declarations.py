"""Every setting, declared once: its variable, flag, parser, default and help.

From `DECLARED` come the frozen `Settings` (its fields and their defaults), what `load_settings`
reads, the CLI's flags and their help (scheduler/cli), `doctor`'s configuration line and the
README's configuration table (jobs/settings/readme.py, held to README.md by a test). A new
setting is one more `Setting` here.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from functools import partial
from operator import attrgetter
from typing import Any

from db.errors import ConfigError
from db.layout import Layout, parse_column_map, parse_run_label, parse_status_map
from jobs.alerts import EVENT_KINDS
from jobs.rules import RetryPolicy
from jobs.settings.engine_parsers import parse_broker_url, parse_task_name
from jobs.settings.notice_parsers import parse_events, parse_public_url, parse_target
from jobs.settings.parsers import (
    LOG_LEVELS,
    parse_callable,
    parse_choice,
    parse_command,
    parse_database_url,
    parse_duration,
    parse_fraction,
    parse_handoff,
    parse_host,
    parse_identifier,
    parse_int,
    parse_kind_limits,
    parse_margin,
    parse_patterns,
    parse_patterns_file,
    parse_switch,
    parse_token,
    parse_webhook,
    parse_webhook_timeout,
)
from jobs.settings.scrapyd_parsers import (
    parse_scrapyd_args,
    parse_scrapyd_password,
    parse_scrapyd_project,
    parse_scrapyd_spider,
    parse_scrapyd_url,
    parse_scrapyd_username,
)

Parser = Callable[[str, str], object]


@dataclass(frozen=True)
class Setting:
    """One setting. `field` is its attribute on `Settings` (`policy.x` on the `RetryPolicy`,
    `layout.x` on the `Layout`)."""

    env: str
    flag: str
    parse: Parser
    field: str
    help: str
    default: str | None = None  # as an operator would write it; parsed for the value
    unset: object = None  # the value without a default to parse (copied for each Settings)
    default_shown: str | None = None  # the default in words where it is no value of its own
    secret: bool = False  # never a click option (`ps` shows argv), never repeated in an error
    doctor: str | None = None  # its place in doctor's configuration line, `{}` its value
    readme: str = ""  # what the README's table says beyond --help

    @property
    def value(self) -> Any:
        """The value when neither the environment, `.env` nor a flag gives one."""
        return copy.copy(_DEFAULTS[self.env])

    @property
    def shown_default(self) -> str | None:
        return self.default if self.default is not None else self.default_shown

    @property
    def option_help(self) -> str:
        """The flag's help, its variable and default in brackets: `... [STUCK_AFTER, 1h]`."""
        shown = self.shown_default
        return f"{self.help} [{self.env}{f', {shown}' if shown is not None else ''}]"

    def of(self, settings: Settings) -> Any:
        """Its value in `settings`."""
        return attrgetter(self.field)(settings)


def _int(minimum: int, maximum: int) -> Parser:
    return partial(parse_int, minimum=minimum, maximum=maximum)


def _choice(*choices: str, upper: bool = False) -> Parser:
    return partial(parse_choice, choices=choices, upper=upper)


def _alert_urls(text: str, name: str) -> tuple:
    """ALERT_URLS, read by jobs.alert_urls: imported when the setting is given, so a process
    without notifications loads none of their code."""
    from jobs.alert_urls import parse_alert_urls as parse

    return parse(text, name)


# fmt: off
S = Setting
DECLARED: tuple[Setting, ...] = (
    S("DATABASE_URL", "--database-url", parse_database_url, "database_url",
      "The runs table's database; required.", secret=True, readme="`postgresql://user:password@host:5432/db`"),
    S("STUCK_AFTER", "--stuck-after", parse_duration, "policy.stuck_after",
      "A run is stuck after this long without progress (90s, 30m, 1h, 1d).", "1h", doctor="stuck after {}"),
    S("RETRY_DELAY", "--retry-delay", partial(parse_duration, allow_zero=True), "policy.retry_delay",
      "Wait this long before a retry.", "4h", doctor="retry after {}"),
    S("MAX_RETRIES", "--max-retries", _int(0, 1000), "policy.max_retries",
      "Retry budget of a chain, fixed at its first failure.", "4", doctor="{} retries"),
    S("RETRY_BACKOFF", "--retry-backoff", _choice("fixed", "exponential"), "policy.backoff",
      "fixed or exponential.", "fixed", readme="`exponential`: delay·2^(n-1), capped by `RETRY_MAX_DELAY`."),
    S("RETRY_MAX_DELAY", "--retry-max-delay", parse_duration, "policy.max_delay",
      "Cap of exponential backoff.", "1d"),
    S("RETRY_JITTER", "--retry-jitter", parse_fraction, "policy.jitter",
      "Random extra delay, as a fraction of the delay.", "0", readme="E.g. `0.1`."),
    S("FAILURE_PATTERNS_FILE", "--failure-patterns-file", parse_patterns_file, "failure_patterns",
      "JSON file of extra failure patterns (and the permanent ones).", unset=(),
      readme="See [Failure patterns](#failure-patterns)."),
    S("PERMANENT_PATTERNS", "--permanent-patterns", parse_patterns, "policy.permanent_patterns",
      "Failure patterns never retried.", "not_found,forbidden",
      readme="Unset, `FAILURE_PATTERNS_FILE`'s `permanent` list replaces the default."),
    S("CHECK_INTERVAL", "--check-interval", parse_duration, "check_interval",
      "How often the stuck checker runs.", "1h"),
    S("PROCESS_INTERVAL", "--process-interval", parse_duration, "process_interval",
      "How often the retry processor runs at least.", "30m"),
    S("DISPATCH_POLL", "--dispatch-poll", parse_duration, "dispatch_poll",
      "How often the daemon looks for a due retry and a free slot.", "5s"),
    S("MAX_CONCURRENT_RETRIES", "--max-concurrent-retries", _int(1, 256), "max_concurrent_retries",
      "Retries executing at once across all processes.", "1",
      readme="Those handed to the fleet and not yet ended count too."),
    S("EXECUTION_TIMEOUT", "--execution-timeout", parse_duration, "execution_timeout",
      "Kill an execution after this long.", default_shown="= the run's limit",
      readme="The run's own limit: its `max_runtime`, else its kind's, else `STUCK_AFTER`."),
    S("CANCEL_TIMEOUT", "--cancel-timeout", parse_duration, "cancel_timeout",
      "A cancelled retry still running this long after SIGTERM (or the engine's cancel) is killed.", "30s"),
    S("BATCH_SIZE", "--batch-size", _int(1, 100_000), "batch_size",
      "Rows per transaction.", "1000"),
    S("HEARTBEAT_COLUMN", "--heartbeat-column", parse_identifier, "heartbeat_column",
      "Column that shows progress (e.g. updated_at).",
      readme="Stuck = no progress for `STUCK_AFTER`; NULL falls back to `started_at`."),
    S("STUCK_AFTER_BY_KIND", "--stuck-after-by-kind", parse_kind_limits, "stuck_after_by_kind",
      "A limit per kind of run (COLUMN_MAP's kind): jobs_de=15m,sitemap_full=8h.", unset={},
      readme="Beats a learned limit and `STUCK_AFTER`; a run's own `max_runtime` beats it. "
             "See [Each run by its own clock](#each-run-by-its-own-clock)."),
    S("LEARN_THRESHOLDS", "--learn-thresholds", parse_switch, "learn_thresholds",
      "on: learn each kind's limit from its completed runs.", "off",
      readme="The p99 runtime times `LEARN_MARGIN`, rounded up to a minute, at least `LEARN_FLOOR`."),
    S("LEARN_WINDOW", "--learn-window", parse_duration, "learn_window",
      "Completed runs this recent teach a kind's limit.", "30d"),
    S("LEARN_MIN_RUNS", "--learn-min-runs", _int(1, 1_000_000), "learn_min_runs",
      "A kind with fewer completed runs in the window is not learned.", "30"),
    S("LEARN_MARGIN", "--learn-margin", parse_margin, "learn_margin",
      "A learned limit is the p99 runtime times this.", "2"),
    S("LEARN_FLOOR", "--learn-floor", parse_duration, "learn_floor",
      "A learned limit is never below this.", "10m"),
    S("STALL_AFTER", "--stall-after", parse_duration, "stall_after",
      "A run whose progress (COLUMN_MAP's progress) stood still this long is stalled.",
      default_shown="= the run's limit"),
    S("SCRAPE_RUNS_TABLE", "--table", partial(parse_identifier, qualified=True), "table",
      "The runs table, optionally schema-qualified.", "scrape_runs", doctor="table {}"),
    S("LOG_LEVEL", "--log-level", _choice(*LOG_LEVELS, upper=True), "log_level",
      "TRACE, DEBUG, INFO, WARNING, ERROR.", "INFO"),
    S("LOG_FORMAT", "--log-format", _choice("text", "json"), "log_format",
      "text or json.", "text", readme="`json` for log shippers."),
    S("METRICS_PORT", "--metrics-port", _int(1, 65535), "metrics_port",
      "Serve Prometheus metrics on this port.", readme="See [Metrics](#metrics)."),
    S("COLUMN_MAP", "--column-map", parse_column_map, "layout.columns",
      "Columns playing id, status, started_at, completed_at, error_message, and kind, max_runtime, progress: "
      "id=run_id,kind=spider,...", unset={},
      readme="Unset, each role is the column of its name: see [Adopting your table](#adopting-your-table). "
             "`kind`, `max_runtime` and `progress` are only what you map: see "
             "[Each run by its own clock](#each-run-by-its-own-clock)."),
    S("STATUS_MAP", "--status-map", parse_status_map, "layout.statuses",
      "Values meaning running, completed, failed, pending_retry, cancelled: completed=done,...", unset={},
      readme="Unset, each state is the value of its name."),
    S("TARGET", "--target", parse_target, "target",
      "What a run scrapes, for stats --by target: a column (site) or host(URL_COLUMN).",
      readme="A text column of the table; see [Stats by target](#stats-by-target)."),
    S("RUN_LABEL", "--run-label", parse_run_label, "layout.label",
      "How runs are named, from {column} placeholders.", default_shown="{search_query} in {location_query}",
      readme="Without those columns, the run's id."),
    S("SCRAPE_RUN_COMMAND", "--command", parse_command, "command",
      "Argv template, e.g. 'python -m scraper --run-id {run_id}'.",
      readme="`{run_id}` and any input column; see [Executing retries](#executing-retries)."),
    S("SCRAPE_RUN_CALLABLE", "--callable", parse_callable, "callable_path",
      "package.module:function called with the run."),
    S("SCRAPE_RUN_WEBHOOK", "--webhook", parse_webhook, "webhook",
      "POST due retries to this URL template (WEBHOOK_SECRET signs them).",
      readme="See [Handing retries to the fleet](#handing-retries-to-the-fleet)."),
    S("WEBHOOK_SECRET", "--webhook-secret", parse_token, "webhook_secret",
      "Key (at least 16 characters) of each delivery's X-Stuck-Runs-Signature.", secret=True),
    S("WEBHOOK_TIMEOUT", "--webhook-timeout", parse_webhook_timeout, "webhook_timeout",
      "How long a delivery waits for the answer.", "30s",
      readme="At most `10m`; no answer in time postpones it."),
    S("SCRAPE_RUN_HANDOFF", "--handoff", parse_handoff, "handoff",
      "queued: hand due retries to the fleet's workers (map queued in STATUS_MAP)."),
    # Retries through Scrapyd (SPEC §16).
    S("SCRAPYD_URL", "--scrapyd-url", parse_scrapyd_url, "scrapyd_url",
      "Schedule due retries on this Scrapyd (http(s)://host:6800; user:password@ for basic auth).", secret=True,
      readme="See [Retries through Scrapyd](#retries-through-scrapyd)."),
    S("SCRAPYD_PROJECT", "--scrapyd-project", parse_scrapyd_project, "scrapyd_project",
      "The Scrapyd project the spider is deployed in."),
    S("SCRAPYD_SPIDER", "--scrapyd-spider", parse_scrapyd_spider, "scrapyd_spider",
      "The spider to schedule: a name or a {column} template."),
    S("SCRAPYD_ARGS", "--scrapyd-args", parse_scrapyd_args, "scrapyd_args",
      "Spider arguments, name={column} templates: query={search_query},location={location_query}.", unset=()),
    S("SCRAPYD_USERNAME", "--scrapyd-username", parse_scrapyd_username, "scrapyd_username", "Scrapyd's basic-auth user (or in SCRAPYD_URL)."),
    S("SCRAPYD_PASSWORD", "--scrapyd-password", parse_scrapyd_password, "scrapyd_password",
      "Scrapyd's basic-auth password (or in SCRAPYD_URL).", secret=True),
    S("CELERY_BROKER_URL", "--celery-broker-url", parse_broker_url, "celery_broker_url",
      "Send due retries as Celery tasks through this broker (redis://, amqp://...).", secret=True,
      readme="Needs `pip install 'stuck-runs[celery]'`. See [Retries through Celery](#retries-through-celery)."),
    S("CELERY_TASK", "--celery-task", parse_task_name, "celery_task",
      "The Celery task's name, e.g. scraper.tasks.scrape (with CELERY_BROKER_URL)."),
    S("CELERY_QUEUE", "--celery-queue", parse_task_name, "celery_queue",
      "The queue the tasks go to.", readme="Unset: the task's own routing (Celery's default queue)."),
    S("ADMIN_HOST", "--host", parse_host, "admin_host",
      "Address `serve` listens on; not loopback only with ADMIN_TOKEN set.", "127.0.0.1"),
    S("ADMIN_PORT", "--port", _int(1, 65535), "admin_port",
      "Port `serve` listens on.", "8080"),
    S("ADMIN_TOKEN", "--admin-token", parse_token, "admin_token",
      "`serve`'s token that may do everything (at least 16 characters).", secret=True),
    S("READ_TOKEN", "--read-token", parse_token, "read_token",
      "`serve`'s token that may only read (at least 16 characters).", secret=True),
    # Being told (SPEC §15).
    S("ALERT_URLS", "--alert-urls", _alert_urls, "alert_urls",
      "Notification URLs (Apprise's: slack://…, mailto://…, json://host/path…), space- or comma-separated.",
      unset=(), secret=True, readme="Unset: no notifications. See [Being told](#being-told)."),
    S("ALERT_EVENTS", "--alert-events", parse_events, "alert_events",
      f"Which events notify: some of {', '.join(EVENT_KINDS)}.", ",".join(EVENT_KINDS)),
    S("ALERT_EVERY", "--alert-every", parse_duration, "alert_every",
      "At most one message per event kind this often; what happens meanwhile waits for the next.", "15m"),
    S("ALERT_MIN_RETRIES", "--alert-min-retries", _int(1, 1_000_000), "alert_min_retries",
      "retry_failure_rate: at least this many retries ended in the last hour.", "10"),
    S("ALERT_FAILURE_RATE", "--alert-failure-rate", parse_fraction, "alert_failure_rate",
      "retry_failure_rate: more than this fraction of them failed.", "0.5"),
    S("PUBLIC_URL", "--public-url", parse_public_url, "public_url",
      "Where people open `serve`'s pages; messages link there.", readme="E.g. `https://stuck-runs.example.com`."),
)
# fmt: on
del S
BY_ENV: Mapping[str, Setting] = {setting.env: setting for setting in DECLARED}
ENV_VARS = tuple(BY_ENV)
FLAG_FOR = {setting.env: setting.flag for setting in DECLARED}
SECRETS = frozenset(setting.env for setting in DECLARED if setting.secret)


def _parse_default(setting: Setting) -> object:
    if setting.default is None:
        return setting.unset
    try:
        return setting.parse(setting.default, setting.env)
    except ConfigError as exc:  # a declaration's mistake: fail on import, in every test
        raise AssertionError(f"the declared default of {setting.env} is refused: {exc}") from None


_DEFAULTS = {setting.env: _parse_default(setting) for setting in DECLARED}


def _inside(values: Mapping[str, object], within: str) -> dict[str, Any]:
    """The entries of `values` (by `Setting.field`) on `policy` or `layout`, by their attribute there."""
    prefix = f"{within}."
    return {field.removeprefix(prefix): value for field, value in values.items() if field.startswith(prefix)}


def _defaults(within: str) -> dict[str, Any]:
    """The declared defaults on `policy` or `layout`."""
    return _inside({setting.field: setting.value for setting in DECLARED}, within)


class _Derived:
    """What `Settings` works out from its fields."""

    __slots__ = ()
    database_url: str | None
    policy: RetryPolicy
    execution_timeout: timedelta | None
    webhook: str | None
    handoff: str | None
    scrapyd_url: object
    celery_broker_url: str | None

    @property
    def hands_off(self) -> str | None:
        """How due retries leave for the fleet (`webhook`, `scrapyd`, `celery`, `queue`), or None when they run here."""
        if self.scrapyd_url:
            return "scrapyd"
        if self.celery_broker_url:
            return "celery"
        return "webhook" if self.webhook else ("queue" if self.handoff else None)

    def require_database_url(self) -> str:
        if not self.database_url:
            raise ConfigError(
                "DATABASE_URL is not set: put DATABASE_URL=postgresql://user:password@host/dbname "
                "in the environment or in .env"
            )
        return self.database_url


def _settings_fields() -> list[tuple[str, Any, Any]]:
    fields: list[tuple[str, Any, Any]] = [
        (s.field, Any, dataclasses.field(default_factory=lambda s=s: s.value, repr=not s.secret))
        for s in DECLARED
        if "." not in s.field
    ]
    fields.append(
        ("policy", RetryPolicy, dataclasses.field(default_factory=lambda: RetryPolicy(**_defaults("policy"))))
    )
    fields.append(("layout", Layout, dataclasses.field(default_factory=lambda: Layout(**_defaults("layout")))))
    # `.env`'s values: the scraper a command or callable starts receives them (under the real
    # environment), as it did when `.env` was loaded into this process's environment.
    fields.append(("dotenv", Mapping[str, str], dataclasses.field(default_factory=dict, repr=False, compare=False)))
    return fields


Settings = dataclasses.make_dataclass("Settings", _settings_fields(), bases=(_Derived,), frozen=True)
Settings.__module__ = __name__
Settings.__doc__ = "Everything stuck-runs is configured with, validated: one field per entry of `DECLARED`."


def settings_from(values: Mapping[str, object], dotenv: Mapping[str, str] | None = None) -> Settings:
    """`Settings` with `values` (by `Setting.field`) over the declared defaults."""
    top = {field: value for field, value in values.items() if "." not in field}
    policy = RetryPolicy(**{**_defaults("policy"), **_inside(values, "policy")})
    layout = Layout(**{**_defaults("layout"), **_inside(values, "layout")})
    return Settings(**top, policy=policy, layout=layout, dotenv=dict(dotenv or {}))
