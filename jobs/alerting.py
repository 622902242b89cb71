"""Notifications (SPEC §15), the service: what the events and the table say happened, recorded in
`stuck_runs_alerts` (folded into what waits), and sent, one message per kind per ALERT_EVERY.

Every process notes what it sees (a sweep's failures, a chain that ended, a failure rate or a
silent checker read from the rows and the job records); any process that ticks claims a kind
whose period ended with a conditional write and sends it, so replicas send one message, not one
each. Nothing here runs inside a sweep's or a retry's transaction: the sweep publishes after its
own commits, and the edges (scheduler/alerts.py) send from a thread of their own.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from db.alerts import AlertRecords
from db.daemons import DaemonRecords
from db.engine import database_errors
from db.messages import STUCK_PATTERN
from jobs import alerts
from jobs.alert_urls import AlertUrl, send
from jobs.events import CHECKER, RetryEnded, SweepFinished
from jobs.rules import run_label
from jobs.runtime import Runtime
from jobs.targets import worst_retry_target

Occurrence = tuple[str, dict]  # an event kind and what happened
Send = Callable[[AlertUrl, str, str], "str | None"]  # title, body -> None when delivered, else the error


@dataclass(frozen=True)
class Delivery:
    """One message to one URL: delivered when `error` is None."""

    kind: str
    url: AlertUrl
    title: str
    error: str | None = None

    @property
    def delivered(self) -> bool:
        return self.error is None


def _records(rt: Runtime) -> AlertRecords:
    return AlertRecords(rt.runs.table.schema, rt.runs.canonical_name)


# -- what happened ------------------------------------------------------------------------------


def occurrences_of(rt: Runtime, event: object) -> list[Occurrence]:
    """The occurrences an event of the services holds: a sweep's failed runs (`stuck`) and the
    chains it ended, a retry that ended its chain (`permanent`). Dry runs hold none."""
    if isinstance(event, SweepFinished):
        result = event.result
        if result.dry_run or not result.failed:
            return []
        return _of_sweep(rt, result)
    if isinstance(event, RetryEnded) and event.outcome.dead_lettered:
        outcome = event.outcome
        pattern = getattr(outcome, "pattern", None) or "unknown"
        error = getattr(outcome, "message", None)
        return [
            (
                alerts.PERMANENT,
                {"count": 1, "labels": [outcome.label], "patterns": {pattern: 1}, "errors": [error] if error else []},
            )
        ]
    return []


def _of_sweep(rt: Runtime, result: Any) -> list[Occurrence]:
    rows = result.rows
    labels = [run_label(row["what"], row["retry_count"], row["budget"]) for row in rows]
    stuck = {"count": result.failed, "sweeps": 1, "labels": labels[: alerts.LISTED_RUNS]}
    kinds = _kinds(rt, [row["run_id"] for row in rows])
    if kinds:
        stuck["kinds"] = kinds
    found: list[Occurrence] = [(alerts.STUCK, stuck)]
    ended = [(label, row) for label, row in zip(labels, rows, strict=True) if row["dead_lettered"]]
    if result.dead_lettered:
        errors = alerts.distinct([row["message"] for _, row in ended])[: alerts.LISTED_ERRORS]
        permanent = {
            "count": result.dead_lettered,
            "labels": [label for label, _ in ended[: alerts.LISTED_RUNS]],
            "patterns": {STUCK_PATTERN: result.dead_lettered},
            "errors": errors,
        }
        found.append((alerts.PERMANENT, permanent))
    return found


def _kinds(rt: Runtime, run_ids: list[str]) -> dict[str, int]:
    """How many of the runs (the sweep's kept ones) are of each kind, when the table maps a kind."""
    kind = rt.runs.kind_text()
    if kind is None or not run_ids:
        return {}
    t = rt.runs.table
    ids = [rt.runs.id_from_text(text) for text in run_ids]
    statement = sa.select(kind, sa.func.count()).where(t.c.id.in_(ids)).group_by(kind)
    with database_errors(rt.engine, "reading the kinds of the failed runs"), rt.engine.connect() as conn:
        return {str(name): n for name, n in conn.execute(statement) if name is not None}


def conditions(rt: Runtime, now: datetime, quiet_since: datetime) -> list[Occurrence]:
    """What holds now and is worth a message: too many retries failed in the last hour (overall,
    or for the worst target when TARGET names what a run scrapes), and a checker that has not
    finished a run for two CHECK_INTERVALs (since `quiet_since`, when it never did: the time this
    process started watching)."""
    settings = rt.settings
    found: list[Occurrence] = []
    with database_errors(rt.engine, "reading what notifications watch"), rt.engine.connect() as conn:
        if alerts.RETRY_FAILURE_RATE in settings.alert_events:
            params = {"sr_since": now - alerts.RATE_WINDOW, "sr_min": settings.alert_min_retries}
            ended, failed = conn.execute(rt.queries.retry_failures(), params).one()
            # The same target `stats --by target` ranks, by the same counts (jobs.targets).
            worst = worst_retry_target(
                rt, alerts.RATE_WINDOW, settings.alert_min_retries, settings.alert_failure_rate, now=now
            )
            over = ended >= settings.alert_min_retries and failed > settings.alert_failure_rate * ended
            if over or worst is not None:
                rate: dict = {"ended": ended, "failed": failed}
                if worst is not None:
                    rate.update(target=worst.group, target_ended=worst.retries, target_failed=worst.failed)
                found.append((alerts.RETRY_FAILURE_RATE, rate))
        if alerts.CHECKER_SILENT in settings.alert_events:
            records = DaemonRecords(rt.runs.table.schema, rt.runs.canonical_name)
            last = conn.execute(records.last_finished(CHECKER)).scalar()
            silent_for = now - (last or quiet_since)
            if silent_for >= alerts.SILENT_AFTER_INTERVALS * settings.check_interval:
                when = last.isoformat(timespec="minutes") if last else None
                silence = {"last_finished": when, "silent_for_s": silent_for.total_seconds()}
                found.append((alerts.CHECKER_SILENT, silence))
    return found


# -- recorded, claimed, sent --------------------------------------------------------------------


def note(rt: Runtime, occurrences: Iterable[Occurrence], now: datetime) -> None:
    """Folds each occurrence of a kind ALERT_EVENTS selects into what waits for its next message,
    one short transaction per kind (its row locked while it folds)."""
    records = _records(rt)
    for kind, occurrence in occurrences:
        if kind not in rt.settings.alert_events:
            continue
        with database_errors(rt.engine, "recording a notification"), rt.engine.begin() as conn:
            conn.execute(records.ensure(kind))
            waiting = conn.execute(records.waiting_for_update(kind)).scalar()
            conn.execute(records.wait(kind, alerts.fold(kind, waiting, occurrence), now))


def claim(rt: Runtime, kind: str, now: datetime) -> Mapping | None:
    """What waits for the kind's message when its period has ended, taken for this process to
    send (None: nothing is due, or another process took it first)."""
    records = _records(rt)
    every = rt.settings.alert_every
    with database_errors(rt.engine, "claiming a notification"), rt.engine.begin() as conn:
        waiting = conn.execute(records.due(kind, now, every)).scalar()
        if waiting is None or conn.execute(records.claim(kind, now, every)).first() is None:
            return None
    return waiting


def send_due(rt: Runtime, now: datetime, send_one: Send = send) -> list[Delivery]:
    """Sends every kind whose period has ended and that has something waiting, to every URL. When
    no URL took a message, what it said waits again and goes with the next one."""
    deliveries: list[Delivery] = []
    for kind in alerts.EVENT_KINDS:
        if kind not in rt.settings.alert_events:
            continue
        occurrence = claim(rt, kind, now)
        if occurrence is None:
            continue
        title, body = alerts.message(kind, occurrence, rt.runs.qualified_name, rt.settings.public_url)
        sent = [Delivery(kind, url, title, send_one(url, title, body)) for url in rt.settings.alert_urls]
        deliveries += sent
        if not any(d.delivered for d in sent):
            note(rt, [(kind, dict(occurrence))], now)
    return deliveries


def tick(rt: Runtime, quiet_since: datetime, send_one: Send = send) -> list[Delivery]:
    """One round of a process that watches: notes what holds now, then sends what is due."""
    now = rt.clock.now()
    note(rt, conditions(rt, now, quiet_since), now)
    return send_due(rt, now, send_one)


def send_trial(urls: Iterable[AlertUrl], table: str | None, send_one: Send = send) -> list[Delivery]:
    """`stuck-runs alert test`: one test message to each URL, each one's outcome."""
    title, body = alerts.trial_message(table)
    return [Delivery("test", url, title, send_one(url, title, body)) for url in urls]
