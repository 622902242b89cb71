"""The runtime: what every service call needs, assembled once at the edge from `Settings`.

The CLI, the script and the daemon each open one `Runtime` and pass it down; services never
build engines or read configuration themselves.
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING

from sqlalchemy.engine import Engine

from db.engine import database_errors, make_engine
from db.errors import ConfigError
from db.queries import RunQueries
from db.queries.groups import target_key
from db.table import RunsTable, load_runs_table
from jobs.clock import SystemClock
from jobs.events import Events
from jobs.patterns import DEFAULT_PATTERNS, Classifier
from jobs.settings import Settings
from jobs.settings.scrapyd_parsers import scrapyd_templates

if TYPE_CHECKING:  # built when a retry is to run (`build_executor`): a sweep starts without the executors
    from jobs.executors.base import Executor


def check_placeholders(settings: Settings, runs: RunsTable) -> None:
    """SCRAPE_RUN_COMMAND, SCRAPE_RUN_WEBHOOK, SCRAPYD_SPIDER and SCRAPYD_ARGS may name `{run_id}` and
    the table's input columns, nothing else."""
    templates = [("SCRAPE_RUN_COMMAND", item) for item in settings.command or ()]
    templates += [("SCRAPE_RUN_WEBHOOK", settings.webhook)] if settings.webhook else []
    templates += scrapyd_templates(settings.scrapyd_spider, settings.scrapyd_args)
    names = {"run_id", *runs.input_names.values()}
    for variable, item in templates:
        for _, name, _, _ in string.Formatter().parse(item):
            if name is not None and name not in names:
                inputs = ", ".join("{" + n + "}" for n in sorted(names))
                raise ConfigError(f"{variable}: {{{name}}} is not a column of {runs.qualified_name}; use {inputs}")


class LazyClassifier(Classifier):
    """The configured patterns, compiled when an error is first classified: a sweep classifies none
    (its message is the stuck one), an execution's outcome does."""

    def __init__(self, patterns: tuple[tuple[str, str], ...]) -> None:
        self._patterns = patterns

    @cached_property
    def _compiled(self) -> tuple:  # type: ignore[override]
        return Classifier(self._patterns)._compiled


WEB_STATEMENT_TIMEOUT_MS = 5000
WEB_POOL = 8  # connections of `serve`; as many again may open for a burst
DELIVERY_POOL = 4  # connections of a process delivering to a webhook (as many again for a burst), whatever the cap


@dataclass
class Runtime:
    settings: Settings
    engine: Engine
    runs: RunsTable
    clock: SystemClock = field(default_factory=SystemClock)
    rng: random.Random = field(default_factory=random.Random)
    classifier: Classifier = field(default_factory=Classifier)
    executor_override: Executor | None = None
    events: Events = field(default_factory=Events)  # what the services publish; the edges subscribe

    @classmethod
    def open(
        cls,
        settings: Settings,
        *,
        role: str = "cli",
        clock: SystemClock | None = None,
        executor: Executor | None = None,
        executes: bool = False,
    ) -> Runtime:
        """Connects, reflects and checks the table; raises an operator error if it cannot.

        With `executes`, the executor is built and checked first: a caller that will claim
        retries is refused before it touches the database, never after a claim.
        """
        url = settings.require_database_url()
        if executes and executor is None:
            from jobs.executors.wiring import build_executor

            executor = build_executor(settings)
        # What serves people waits for nothing for long: a page that would hang on a lock answers 500.
        timeout = WEB_STATEMENT_TIMEOUT_MS if role == "web" else None
        # A slot executing here holds a session (its advisory lock); a delivery to the fleet holds
        # none while the fleet answers (SPEC §12), so a webhook's process keeps a small pool whatever the cap.
        pool = (
            WEB_POOL
            if role == "web"
            else DELIVERY_POOL
            if settings.webhook or settings.scrapyd_url or settings.celery_broker_url
            else settings.max_concurrent_retries + 2
        )
        engine = make_engine(url, role=role, pool_size=pool, statement_timeout_ms=timeout)
        with database_errors(engine, "connecting"), engine.connect() as conn:
            runs = load_runs_table(conn, settings.table, settings.heartbeat_column, settings.layout)
        check_placeholders(settings, runs)
        if settings.target:  # TARGET must name a text column of this table: refused at start, in one line
            target_key(runs, settings.target)
        classifier = LazyClassifier(settings.failure_patterns + DEFAULT_PATTERNS)
        return cls(settings, engine, runs, clock or SystemClock(), classifier=classifier, executor_override=executor)

    @cached_property
    def queries(self) -> RunQueries:
        return RunQueries(self.runs)

    @cached_property
    def executor(self) -> Executor:
        """Built on first use (or at `open` with `executes`), so commands that execute nothing
        need no executor configured."""
        from jobs.executors.wiring import build_executor

        return self.executor_override or build_executor(self.settings)

    def close(self) -> None:
        executor = self.__dict__.get("executor") or self.executor_override
        if executor is not None:
            executor.close()  # a webhook's pooled connections
        self.engine.dispose()
