"""The executor the settings ask for, built once at the edge (`Runtime.open`, `Runtime.executor`).

Each executor is one module of this package; adding one is that module and one line here.
"""

from __future__ import annotations

import shutil

from db.errors import ConfigError
from jobs.executors.base import Executor, ExecutorMisconfigured
from jobs.executors.callable import CallableExecutor
from jobs.executors.command import CommandExecutor
from jobs.executors.queue import QueueExecutor
from jobs.settings import Settings


def build_executor(settings: Settings) -> Executor:
    """The executor the settings ask for; `ConfigError` when none is configured."""
    if settings.command:
        program = settings.command[0]
        if shutil.which(program) is None:
            raise ExecutorMisconfigured(f"SCRAPE_RUN_COMMAND: {program!r} is not found or not executable: check PATH")
        return CommandExecutor(settings.command, settings.dotenv)
    if settings.callable_path:
        return CallableExecutor(settings.callable_path, settings.dotenv)
    if settings.webhook:
        from jobs.executors.webhook import WebhookExecutor  # httpx only where retries are delivered

        return WebhookExecutor(settings.webhook, settings.webhook_secret, settings.webhook_timeout)
    if settings.handoff:
        return QueueExecutor(settings.handoff)
    if settings.scrapyd_url:
        from jobs.executors.scrapyd import ScrapydExecutor  # httpx only where retries are delivered

        return ScrapydExecutor.from_settings(settings)
    if settings.celery_broker_url:
        from jobs.executors.celery import CeleryExecutor  # Celery only where retries are sent to it

        priority = settings.layout.columns.get("priority")
        return CeleryExecutor(settings.celery_broker_url, settings.celery_task, settings.celery_queue, priority)
    raise ConfigError(
        "no executor configured: set SCRAPE_RUN_COMMAND (e.g. 'python -m scraper --run-id {run_id}'), "
        "SCRAPE_RUN_CALLABLE (package.module:function), SCRAPE_RUN_WEBHOOK (a URL), SCRAPE_RUN_HANDOFF (queued), SCRAPYD_URL (with SCRAPYD_PROJECT and SCRAPYD_SPIDER) or CELERY_BROKER_URL with CELERY_TASK"
    )
