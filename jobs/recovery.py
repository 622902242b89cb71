"""The one service entry for a full recovery pass: the manual script and `stuck-runs fix`."""

from __future__ import annotations

import threading
from dataclasses import dataclass, replace
from datetime import timedelta

from db.errors import ConfigError
from jobs.retries import ProcessResult, process_due_retries
from jobs.runtime import Runtime
from jobs.settings import settings_from_environment
from jobs.stuck import KEPT_RUNS, SweepResult, sweep_stuck_runs


@dataclass(frozen=True)
class FixResult:
    sweep: SweepResult
    process: ProcessResult


def fix_stuck_runs_with_retry(
    max_duration_hours: float = 1,
    retry_delay_hours: float = 4,
    max_retries: int = 4,
    *,
    runtime: Runtime | None = None,
    dry_run: bool = False,
    stop: threading.Event | None = None,
    keep: int | None = KEPT_RUNS,
) -> FixResult:
    """A stuck-run sweep, then a pass over due retries.

    Runs stuck longer than `max_duration_hours` are failed and retried `retry_delay_hours`
    later, up to `max_retries` times per chain. Without `runtime`, configuration comes from the
    environment and `.env` (DATABASE_URL, the executor...). With `stop` set the sweep ends after
    its batch and executing retries go back to `pending_retry`. The sweep, each retry's start and
    end, and the pass are published on `runtime.events` as they happen.
    The sweep's result keeps the rows of its first `keep` runs (None: all).
    """
    if max_duration_hours <= 0 or retry_delay_hours < 0 or max_retries < 0:
        raise ConfigError(
            f"fix_stuck_runs_with_retry({max_duration_hours}, {retry_delay_hours}, {max_retries}): "
            "max_duration_hours must be above 0, retry_delay_hours and max_retries 0 or more"
        )
    owned = runtime is None
    if runtime is None:
        runtime = Runtime.open(settings_from_environment(), executes=not dry_run)
    try:
        if not dry_run:
            _ = runtime.executor  # no executor: refused before the sweep changes anything
        policy = replace(
            runtime.settings.policy,
            stuck_after=timedelta(hours=max_duration_hours),
            retry_delay=timedelta(hours=retry_delay_hours),
            max_retries=max_retries,
        )
        sweep = sweep_stuck_runs(runtime, policy, dry_run=dry_run, stop=stop, keep=keep)
        process = process_due_retries(runtime, policy, dry_run=dry_run, stop=stop)
        return FixResult(sweep, process)
    finally:
        if owned:
            runtime.close()
