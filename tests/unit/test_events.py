"""The events' delivery: every subscriber, in order; one that raises is logged, never stops the rest."""

from __future__ import annotations

from datetime import datetime, timezone

from loguru import logger

from jobs.events import DAEMON, Events, JobRun, JobRunsEnded, SweepFinished
from jobs.stuck import SweepResult

AT = datetime(2026, 1, 1, tzinfo=timezone.utc)


def test_each_subscriber_gets_each_event_in_the_order_they_subscribed():
    events, seen = Events(), []
    events.subscribe(lambda event: seen.append(("first", event)))
    events.subscribe(lambda event: seen.append(("second", event)))
    swept = SweepFinished(SweepResult(failed=1))
    events.publish(swept)
    assert seen == [("first", swept), ("second", swept)]


def test_a_subscriber_that_raises_is_logged_and_the_others_still_hear():
    events, seen, lines = Events(), [], []

    def broken(event: object) -> None:
        raise RuntimeError("the metrics port went away")

    events.subscribe(broken)
    events.subscribe(seen.append)
    sink = logger.add(lambda message: lines.append(message.record), level="ERROR")
    try:
        ended = JobRunsEnded((JobRun("stuck_run_checker", "ok", {"failed": 0}),), AT, AT, DAEMON)
        events.publish(ended)  # returns: the work that published it goes on
    finally:
        logger.remove(sink)
    assert seen == [ended]
    [line] = lines
    assert line["extra"]["event"] == "subscriber_error"
    assert "broken" in line["message"] and "JobRunsEnded" in line["message"]
    assert "RuntimeError: the metrics port went away" in line["message"]


def test_unsubscribing_stops_the_events():
    events, seen = Events(), []
    unsubscribe = events.subscribe(seen.append)
    events.publish(SweepFinished(SweepResult()))
    unsubscribe()
    events.publish(SweepFinished(SweepResult()))
    assert len(seen) == 1


def test_a_job_run_says_what_it_counted_or_its_error():
    assert JobRun("retry_processor", "ok", {"superseded": 0, "executed": 2}).summary == "superseded=0, executed=2"
    assert JobRun("retry_processor", "ok", {}).summary == "done"
    assert JobRun("stuck_run_checker", "error", {}, "database unavailable").summary == "error: database unavailable"
