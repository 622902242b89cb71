"""The executors' written protocol (jobs/executors/): each executor names its own dispatch strategy,
the settings choose the executor in one place, what a webhook's answer means is a pure function
to an outcome of the closed set, and nothing asks an executor or an execution what it is."""

from __future__ import annotations

import ast
import threading
from datetime import timedelta
from decimal import Decimal
from pathlib import Path

import pytest

from jobs.executors.callable import CallableExecutor
from jobs.executors.command import CommandExecutor
from jobs.executors.inprocess import InProcess
from jobs.executors.outcome import Completed, Failed, HandedOver, Postponed
from jobs.executors.queue import QueueExecutor
from jobs.executors.webhook import WebhookExecutor, judge
from jobs.executors.wiring import build_executor
from jobs.model import Run
from jobs.outcomes import postponement
from jobs.rules import RetryPolicy
from jobs.settings import Settings

REPO = Path(__file__).resolve().parent.parent.parent


class Named:
    """Strategies that only say which one the executor picked."""

    def run_here(self, executor):
        return "run here", executor

    def deliver(self, executor):
        return "deliver", executor

    def queue(self, executor):
        return "queue", executor


class Quick(InProcess):
    def execute(self, run, timeout, cancel):
        return Completed()


@pytest.mark.parametrize(
    "settings, kind, strategy",
    [
        (Settings(command=("true", "{run_id}")), CommandExecutor, "run here"),
        (Settings(callable_path="tests.scrapers:succeed"), CallableExecutor, "run here"),
        (Settings(webhook="http://127.0.0.1:9/r/{run_id}"), WebhookExecutor, "deliver"),
        (Settings(handoff="queued"), QueueExecutor, "queue"),
    ],
)
def test_the_settings_choose_the_executor_and_the_executor_its_strategy(settings, kind, strategy):
    executor = build_executor(settings)
    try:
        assert type(executor) is kind
        assert executor.dispatch_with(Named()) == (strategy, executor)
    finally:
        executor.close()


def test_an_in_process_executor_runs_here_and_its_execution_is_the_work():
    executor = Quick()
    assert executor.dispatch_with(Named()) == ("run here", executor)
    run = Run(id="r1", status="running", what="x")
    assert executor.start(run).wait(timedelta(seconds=1), threading.Event()) == Completed()


def test_a_webhook_answer_is_judged_into_one_outcome():
    assert judge(200, "OK") == judge(204) == HandedOver("webhook")
    assert judge(503, "Service Unavailable", "120") == Postponed(
        "Webhook answered HTTP 503 Service Unavailable", retry_after=timedelta(seconds=120)
    )
    assert judge(429, "Too Many Requests") == Postponed("Webhook answered HTTP 429 Too Many Requests")
    assert judge(404, "Not Found", None, "no such\n  search") == Failed(
        "Webhook answered HTTP 404 Not Found: no such search"
    )
    assert judge(500, "Internal Server Error", "60") == Failed(
        "Webhook answered HTTP 500 Internal Server Error", retry_after=timedelta(seconds=60)
    )


def test_a_postponement_takes_the_retry_after_else_doubles_from_a_minute_up_to_the_retry_delay():
    policy = RetryPolicy(retry_delay=timedelta(minutes=10))
    assert postponement(timedelta(seconds=5), policy, 7) == timedelta(seconds=5)  # the fleet knows
    assert [postponement(None, policy, n) for n in range(6)] == [timedelta(minutes=m) for m in (1, 2, 4, 8, 10, 10)]
    assert postponement(None, RetryPolicy(retry_delay=timedelta(seconds=10)), 3) == timedelta(minutes=1)


def test_the_executors_import_nothing_from_the_services_that_dispatch_them():
    services = {"jobs.retries", "jobs.running", "jobs.delivery", "jobs.queueing", "jobs.outcomes", "jobs.runtime"}
    found = {}
    for path in sorted((REPO / "jobs" / "executors").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module in services:
                found.setdefault(path.name, []).append(node.module)
    assert found == {}


def test_a_run_s_priority_is_put_on_the_broker_s_scale_turned_around_for_redis():
    from jobs.executors.celery import broker_priority, runs_low_first

    assert runs_low_first("redis://:pw@h:6379/0") and runs_low_first("rediss://h/0")
    assert not runs_low_first("amqp://guest@h//")
    redis = [broker_priority(p, low_first=True) for p in (9, 8, 5, 0, -3, 42)]
    assert redis == [0, 1, 4, 9, 9, 0]  # higher first becomes lower first; clamped to 0..9
    assert [broker_priority(p, low_first=False) for p in (9, 2.6, -1, 100)] == [9, 3, 0, 9]


def test_a_run_with_no_priority_goes_last_nan_and_infinity_counting_as_none():
    """PostgreSQL's numeric and double precision hold NaN and ±Infinity: a priority like that is
    none (never an error in the delivery lane). None goes last: 9 on Redis (0 first); on AMQP no
    priority option (its default, 0, is the last)."""
    from jobs.executors.celery import broker_priority
    from jobs.executors.scrapyd import ScrapydExecutor
    from jobs.model import Run

    nothing = (None, float("nan"), float("inf"), float("-inf"), Decimal("NaN"), Decimal("Infinity"))
    assert [broker_priority(p, low_first=True) for p in nothing] == [9] * len(nothing)
    assert [broker_priority(p, low_first=False) for p in nothing] == [None] * len(nothing)
    scrapyd = ScrapydExecutor("http://127.0.0.1:1", "p", "s", priority="urgency")
    try:
        for value in nothing:
            assert "priority" not in scrapyd.job(Run(id="r1", status="running", what="q", inputs={"urgency": value}))
        assert (
            scrapyd.job(Run(id="r1", status="running", what="q", inputs={"urgency": Decimal("2.5")}))["priority"]
            == "2.5"
        )
    finally:
        scrapyd.close()
