"""CELERY_BROKER_URL + CELERY_TASK (SPEC §16): a due retry is sent as a Celery task, `task_id` =
the retry's id, `run_id` and the run's inputs (by their real names) as keyword arguments; the
task writes the run's outcome into its row, as any run does.

It delivers one retry at a time (`Delivers`) through §12's hand-over (jobs/delivery.py): the row
is committed `running` and marked before the task is sent, confirmed after. A broker that cannot
be reached puts the retry back (`Postponed`: due again after the postponements' backoff, no
budget spent). A retry whose sending process died is never sent again (`sends_again` False): the
task may already be in the queue, and a task lost that way is found by the stuck checker like any
run. Celery is an optional dependency (`pip install 'stuck-runs[celery]'`), imported only here.

A run's priority (COLUMN_MAP's `priority`, higher first) is clamped to 0..9 and, for Redis, whose
transport runs 0 first, turned around (9 - p): a priority-9 run is sent at Redis priority 0.
AMQP brokers run the higher number first, so it travels as it is. A run with none (NULL, NaN,
±Infinity) goes last: at 9 on Redis, with no priority option on AMQP.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit

from loguru import logger

from jobs.executors.base import ExecutorMisconfigured, Strategies, T
from jobs.executors.outcome import DeliveryOutcome, HandedOver, Misconfigured, Postponed, Released
from jobs.model import Run
from jobs.rules import known_priority

MODE = "celery"  # the `handed_off` value of a retry sent here
EXTRA = "pip install 'stuck-runs[celery]'"
CONNECT_TIMEOUT = timedelta(seconds=5)
PRIORITY_STEPS = 10  # 0..9: what Redis's and RabbitMQ's Celery transports both take
INSPECT_TIMEOUT = 2.0  # how long `still_running` waits for the workers' answers (once a pass)
# Deliveries a pass runs at once (jobs/delivery.py `lanes_for`), whatever the cap: a send_task takes
# a few milliseconds, so a handful of lanes keeps the broker busy; 100 threads only contend for the
# interpreter. The app's pool holds a connection for each (its default is 10), so they never wait.
LANES = 24


def load_celery() -> Any:
    """The `celery` package, or one line naming the extra to install (exit 2)."""
    try:
        import celery
    except ImportError:
        raise ExecutorMisconfigured(f"CELERY_BROKER_URL is set but Celery is not installed here: {EXTRA}") from None
    return celery


def runs_low_first(broker_url: str) -> bool:
    """Whether the broker's transport runs priority 0 first (Redis) rather than the highest (AMQP)."""
    return urlsplit(broker_url).scheme.lower() in ("redis", "rediss", "sentinel")


def broker_priority(priority: object, low_first: bool) -> int | None:
    """The run's priority (higher first) on the broker's 0..9 scale. A run with none goes last: on
    a broker running 0 first, at 9 (kombu's default, 0, would run it first); else None (no
    priority option: AMQP's default, 0, is its last)."""
    number = known_priority(priority)
    if number is None:
        return PRIORITY_STEPS - 1 if low_first else None
    step = max(0, min(PRIORITY_STEPS - 1, round(number)))
    return PRIORITY_STEPS - 1 - step if low_first else step


def task_kwargs(run: Run) -> dict[str, Any]:
    """`run_id` and the inputs, as JSON holds them (a timestamp in ISO 8601, a UUID as text)."""
    fields = {**run.inputs, "run_id": run.id}
    return json.loads(json.dumps(fields, default=lambda v: v.isoformat() if hasattr(v, "isoformat") else str(v)))


def redacted(broker_url: str) -> str:
    """The broker as a log line may show it: scheme, host and port of each (`;` between Celery's
    failover or Sentinel URLs), never a password."""

    def one(url: str) -> str:
        try:
            parts = urlsplit(url.strip())
            port = f":{parts.port}" if parts.port else ""
            return f"{parts.scheme}://{parts.hostname}{port}"
        except ValueError:  # refused at start (jobs/settings/engine_parsers.py); never a traceback here
            return f"{urlsplit(url.strip()).scheme}://…"

    return ";".join(one(url) for url in broker_url.split(";"))


REFUSED_LOGIN = ("AuthenticationError", "AccessRefused")  # redis-py's and py-amqp's, by name: neither imported here


# What redis-py raises once a command was written whole and the broker, still connected, did not
# answer in time (redis/connection.py's read_response): it may have queued the task. Not a connection
# found closed at the read: that is what a pooled socket to a broker killed since says (nothing
# queued), and a Redis that died after queueing it lost it too unless it persists its data.
REPLY_LOST = ("Timeout reading from",)


def raised_from(exc: BaseException | None) -> Iterator[BaseException]:
    """`exc` and what it was raised from, outermost first."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        yield exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__


def refused_login(exc: BaseException | None) -> bool:
    """Whether the broker answered and refused the credentials (anywhere in what `exc` was raised
    from): a configuration to fix, not a broker that is down."""
    return any(type(e).__name__ in REFUSED_LOGIN for e in raised_from(exc))


def reply_lost(exc: BaseException | None) -> bool:
    """Whether the send failed after the broker was given the whole message (its answer late)."""
    return any(str(e).startswith(REPLY_LOST) for e in raised_from(exc))


def credentials_refused(broker: str) -> str:
    return f"Celery broker {broker} refused the credentials: check the user and password in CELERY_BROKER_URL"


class CeleryExecutor:
    """Sends retries through one Celery app (its broker connections pooled between sends)."""

    mode = MODE
    lanes: int | None = LANES
    sends_again = False  # a send whose process died may have reached the queue: never sent twice

    def __init__(
        self, broker_url: str, task: str, queue: str | None = None, priority_column: str | None = None
    ) -> None:
        celery = load_celery()
        self.broker = redacted(broker_url)
        self.task, self.queue = task, queue
        self.priority_column = priority_column  # the input the run's priority is read from, if mapped
        self.low_first = runs_low_first(broker_url)
        self.app = celery.Celery("stuck-runs", broker=broker_url, set_as_current=False)
        seconds = CONNECT_TIMEOUT.total_seconds()
        self.app.conf.update(
            broker_connection_retry=False,
            broker_connection_retry_on_startup=False,
            broker_connection_timeout=seconds,
            broker_transport_options={"socket_connect_timeout": seconds, "socket_timeout": seconds, "max_retries": 0},
            task_create_missing_queues=True,
            result_backend=None,
            broker_pool_limit=LANES,
        )
        # The longest one send lasts: the broker's connect and socket timeouts (retries off). A lane
        # of a pass never waits for a pooled connection (one each); a daemon's slots beyond LANES may.
        self.bound = CONNECT_TIMEOUT * 2

    def dispatch_with(self, strategies: Strategies[T]) -> T:
        return strategies.deliver(self)

    def send(self, run: Run) -> HandedOver | Postponed | Misconfigured:
        """One `send_task`; a broker that cannot be reached postpones the retry (nothing was sent), one
        that refuses the credentials leaves it untouched and says so once (a configuration to fix)."""
        options: dict[str, Any] = {"task_id": str(run.id), "kwargs": task_kwargs(run), "retry": False}
        if self.queue:
            options["queue"] = self.queue
        if self.priority_column:  # none mapped: no priority option (nothing to order them by)
            priority = broker_priority(run.inputs.get(self.priority_column), self.low_first)
            if priority is not None:
                options["priority"] = priority
        try:
            self.app.send_task(self.task, **options)
        # kombu raises OperationalError alike for a broker that could not be reached (nothing was
        # written: postponed) and for a reply lost after the whole message was written, told apart
        # by redis-py's own words: the broker may have queued that one, and a retry is never sent
        # twice (`sends_again`): handed over; a task that was lost after all, the stuck checker finds.
        except Exception as exc:  # noqa: BLE001 - kombu's and the transport's own errors: the broker is not there
            if refused_login(exc):
                return Misconfigured(credentials_refused(self.broker))
            if reply_lost(exc):
                logger.bind(run_id=str(run.id), event="reply_lost").warning(
                    "{}: Celery broker {} was sent the task but its answer was lost ({}): counted handed over, "
                    "never sent twice; if the broker did not keep it, the stuck checker fails the run after STUCK_AFTER",
                    run.label,
                    self.broker,
                    type(exc).__name__,
                )
                return HandedOver(MODE)
            return Postponed(f"Celery broker {self.broker} unreachable: {type(exc).__name__}")
        return HandedOver(MODE)

    def deliver(self, run: Run, stop: threading.Event) -> DeliveryOutcome:
        """`send`, in the lane itself (a hand-off to a thread of its own and back cost more than the
        send): bounded by the broker's timeouts (`bound`), so the lane needs no thread to give up on
        it. A send under way when `stop` is set ends first (within `bound`)."""
        if stop.is_set():
            return Released()
        return self.send(run)

    def cancel(self, run: Run, *, kill: bool) -> str:
        """Revokes the run's task and terminates it where a worker runs it (SIGKILL with `kill`);
        raises what the broker raised when it cannot be reached."""
        signal = "SIGKILL" if kill else "SIGTERM"
        self.app.control.revoke(str(run.id), terminate=True, signal=signal)
        return f"revoked, terminate with {signal}"

    def still_running(self, runs: list[Run]) -> list[Run] | None:
        """Those of `runs` whose task a worker reports among its active ones: one question to the
        workers (waiting INSPECT_TIMEOUT for their answers) for them all. None when the broker
        cannot be reached (nothing can tell whether they stopped)."""
        try:
            active = self.app.control.inspect(timeout=INSPECT_TIMEOUT).active() or {}
        except Exception:  # noqa: BLE001 - kombu's and the transport's own errors: the broker is not there
            return None
        ids = {task.get("id") for tasks in active.values() for task in tasks or []}
        return [run for run in runs if str(run.id) in ids]

    def check(self) -> str:
        """That the broker answers (doctor); raises what the connection raised."""
        with self.app.connection_for_write() as connection:
            connection.ensure_connection(max_retries=1, timeout=CONNECT_TIMEOUT.total_seconds())
        return f"Celery broker {self.broker} answers; tasks go to {self.task}" + (
            f" on {self.queue}" if self.queue else ""
        )

    def close(self) -> None:
        self.app.close()
