"""Logging for operators (text) and for log shippers (one JSON object per line)."""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

from loguru import logger

from jobs.events import DAEMON, Event, JobRunsEnded, ProcessorPassFinished

TEXT_FORMAT = "{time:YYYY-MM-DD HH:mm:ss!UTC}Z | {level: <7} | {message}"
CONTEXT_KEYS = ("event", "run_id", "chain", "attempt", "retry_id", "pattern", "job")


def _json_line(record: dict[str, Any]) -> str:
    entry = {
        "time": record["time"].isoformat(),
        "level": record["level"].name,
        "message": record["message"],
        **{k: v for k, v in record["extra"].items() if v not in (None, "")},
    }
    if record["exception"] is not None:
        entry["exception"] = repr(record["exception"].value)
    record["extra"]["_json"] = json.dumps(entry, default=str)
    return "{extra[_json]}\n"


class _ToLoguru(logging.Handler):
    """Routes a library's standard-logging records (APScheduler's) into our sink and format."""

    def emit(self, record: logging.LogRecord) -> None:
        level = record.levelname if record.levelname in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL") else "INFO"
        logger.bind(source=record.name).opt(exception=record.exc_info).log(level, record.getMessage())


def route_library_logs() -> None:
    """APScheduler's warnings and errors (a missed run...) in our format; its INFO chatter is ours to say."""
    library = logging.getLogger("apscheduler")
    library.handlers[:] = [_ToLoguru()]
    library.propagate = False
    library.setLevel(logging.WARNING)
    # A job that raises is reported by the daemon's own listener, in one line; APScheduler's
    # executor would add a traceback per failed tick.
    logging.getLogger("apscheduler.executors").setLevel(logging.CRITICAL)


def configure_logging(level: str = "INFO", fmt: str = "text") -> None:
    """Replaces loguru's default sink with one on stderr in the chosen format."""
    route_library_logs()
    logger.remove()
    if fmt == "json":
        logger.add(sys.stderr, level=level, format=_json_line, backtrace=False, diagnose=False)
    else:
        logger.add(sys.stderr, level=level, format=TEXT_FORMAT, backtrace=False, diagnose=False)


def log_daemon_event(event: Event) -> None:
    """Subscriber (the daemon's): a line per job run, and why due retries wait, once a tick."""
    match event:
        case ProcessorPassFinished(result) if result.waiting is not None:
            waiting = result.waiting  # a pass that starts nothing says why
            logger.bind(event="retries_waiting", due=waiting.due).info("retry processor: {}", waiting.message)
        case JobRunsEnded(runs, via=via) if via == DAEMON:
            for run in runs:
                log = logger.bind(job=run.job_id, event="job_run")
                if run.error is None:
                    log.info("{} finished: {}", run.job_id, run.summary)
                else:
                    log.error("{} failed: {}", run.job_id, run.error)
