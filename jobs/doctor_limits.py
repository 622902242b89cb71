"""`doctor`'s part of SPEC §14: the limits in force by kind and where each comes from, and warnings
(never refusals) about what would make them wrong: a configured kind no run has, a `max_runtime`
column holding negative or absurd limits, a `progress` column that does not hold numbers.

Each finding is `(name, ok, detail, fix, warning)`, which `jobs.doctor` turns into its checks.
Reads only: learned limits are shown as stored, never computed here.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import sqlalchemy as sa

from db.queries.thresholds import ThresholdStatements
from db.table import RunsTable
from jobs import learning
from jobs.learning import span
from jobs.limits import Limits, learned_by_kind, limit_for

SAMPLE = 10_000  # rows a column is judged by
ABSURD = timedelta(days=3650)  # a max_runtime over ten years is a unit mistake (milliseconds?), not a limit
NUMERIC = (sa.Integer, sa.Numeric, sa.Float)

Finding = tuple[str, bool, str, "str | None", bool]


def limit_findings(conn: sa.Connection, settings: object, runs: RunsTable) -> list[Finding]:
    q = ThresholdStatements(runs)
    findings = [_resolved(conn, q, settings, runs)]
    if runs.kind and settings.stuck_after_by_kind:
        since = datetime.now(timezone.utc) - settings.learn_window
        kinds = list(settings.stuck_after_by_kind)
        absent = conn.execute(q.kinds_absent(), {"sr_kinds": kinds, "sr_since": since}).scalars().all()
        if absent:
            kind = runs.name_of(runs.kind)
            findings.append(
                (
                    "limits by kind",
                    True,
                    f"STUCK_AFTER_BY_KIND names {', '.join(map(repr, sorted(absent)))}, which no run completed in "
                    f"{span(settings.learn_window)} nor any running run has in {kind}",
                    f"check the spelling against the values of {kind}, or leave the kind out",
                    True,
                )
            )
    if runs.max_runtime:
        found = (
            conn.execute(q.max_runtime_outliers(), {"sr_limit": SAMPLE, "sr_absurd": ABSURD.total_seconds()})
            .mappings()
            .one()
        )
        if found["negative"] or found["absurd"]:
            findings.append(
                (
                    "max_runtime",
                    True,
                    f"of {found['sampled']:,} rows sampled with a {runs.name_of(runs.max_runtime)}, "
                    f"{found['negative']:,} are negative and {found['absurd']:,} longer than ten years: such a run "
                    "is judged stuck at once, or never",
                    "have the scraper write the limit in seconds (or as an interval), or NULL for none",
                    True,
                )
            )
    if runs.progress_counter:
        findings.extend(_progress(conn, q, runs))
    return findings


def _resolved(conn: sa.Connection, q: ThresholdStatements, settings: object, runs: RunsTable) -> Finding:
    """The limits in force: the default, each configured and learned kind, the kinds not learned."""
    stored = learning.stored(conn, q) if settings.learn_thresholds else None
    learned = learned_by_kind(stored.kinds, stored.computed_at) if stored is not None else {}
    limits = Limits.from_settings(settings, learned)
    shown = [f"default {span(limits.default)} (STUCK_AFTER)"]
    for kind in sorted({*limits.configured, *limits.learned}):
        applied = limit_for(limits, kind)
        source = f"learned from {applied.learned_from:,} runs" if applied.source == "learned" else applied.source
        shown.append(f"{kind} {span(applied.limit)} ({source})")
    if settings.learn_thresholds:
        if stored is None:
            shown.append("learning on, nothing learned yet: the first process that needs the limits learns them")
        else:
            few = [k for k in stored.kinds if k.kind is not None and k.limit is None]
            if few:
                listed = ", ".join(f"{k.kind} ({k.runs} runs)" for k in few)
                shown.append(f"not learned, fewer than LEARN_MIN_RUNS={settings.learn_min_runs} runs: {listed}")
    if not runs.kind and (limits.configured or settings.learn_thresholds):
        return (
            "limits",
            True,
            "; ".join(shown) + "; but COLUMN_MAP maps no kind, so every run gets the default",
            "map the column that says what sort of run a row is: COLUMN_MAP=kind=spider",
            True,
        )
    return ("limits", True, "; ".join(shown), None, False)


def _progress(conn: sa.Connection, q: ThresholdStatements, runs: RunsTable) -> list[Finding]:
    column = runs.c[runs.progress_counter]
    if isinstance(column.type, NUMERIC):
        return []
    found = conn.execute(q.progress_not_numbers(), {"sr_limit": SAMPLE}).mappings().one()
    if isinstance(column.type, sa.String) and not found["not_numbers"]:
        return []
    name = runs.name_of(runs.progress_counter)
    sampled, odd = found["sampled"], found["not_numbers"]
    seen = f"; of {sampled:,} values sampled, {odd:,} are not numbers" if sampled else ""
    return [
        (
            "progress",
            True,
            f"{name} ({column.type}) is not a number column{seen}: progress is compared as the scraper writes it",
            f"map a counter the scraper raises (items, pages) as progress, or make {name} an integer column",
            True,
        )
    ]
