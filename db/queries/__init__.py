"""Every statement stuck-runs runs on `scrape_runs`, in one place.

Built once per reflected table (`RunQueries(runs)`), reused for every batch. Each state change is
an UPDATE conditional on the state it expects; callers read RETURNING to learn what really
changed. Per-row values computed by the rules travel as arrays through `unnest`, so a batch is
a constant number of statements whatever its size.
"""

from __future__ import annotations

from db.queries.alerts import AlertStatements
from db.queries.cancels import CancelStatements
from db.queries.common import NOW
from db.queries.handoff import HandoffStatements
from db.queries.reports import ReportStatements
from db.queries.retries import RetryStatements
from db.queries.sweep import SweepStatements, render
from db.queries.timeline import TimelineStatements

__all__ = ["NOW", "RunQueries", "render"]


class RunQueries(
    SweepStatements,
    RetryStatements,
    HandoffStatements,
    ReportStatements,
    TimelineStatements,
    AlertStatements,
    CancelStatements,
):
    """The statements for one table. Parameters are bound by name, all prefixed `sr_`: `sr_now`, `sr_run_id`...

    One module per concern: the stuck sweep (`sweep`), retries and claims (`retries`), retries
    handed to the fleet (`handoff`), reports and statistics (`reports`), on the shared pieces of `common`.
    """
