"""The statement behind `stats --by` (SPEC §15): the window's numbers per group of runs — per
target (`TARGET`: a column or the host of a URL column), per kind (COLUMN_MAP's kind) or per any
column.

One pass over the window's rows: the attempts started in it (the newest-first index) or ended in
it among those stuck-runs handled (the ended-attempts index), PostgreSQL OR-ing the two indexes'
bitmaps. The numbers agree with `stats`: a group's retries ended, stuck detections and
permanently failed chains are counted as `stats` counts them, and the groups add up to its totals.
"""

from __future__ import annotations

import sqlalchemy as sa

from db.errors import ConfigError
from db.messages import STUCK_PATTERN
from db.queries.reports import ReportStatements
from db.table import RunsTable

KIND = "kind"


def url_host(url: sa.ColumnElement) -> sa.ColumnElement:
    """A URL's host: after an optional `scheme://` and user info, up to the port, path, query or
    fragment; lower case, as hosts compare. A value with no host (empty, `/path`) is NULL.

    String functions, not a regular expression: over the 190,000 runs of a week of ten million
    rows, `substring(url FROM pattern)` took 0.4 s and these take a tenth of that."""
    sep = sa.func.strpos(url, "://")
    # `://` opens the URL only where it holds the first slash (not in `site.com/?next=http://x`).
    rest = sa.case((sa.and_(sep > 0, sa.func.strpos(url, "/") == sep + 1), sa.func.substr(url, sep + 3)), else_=url)
    authority = sa.func.split_part(sa.func.split_part(sa.func.split_part(rest, "/", 1), "?", 1), "#", 1)
    host_port = sa.func.substr(authority, sa.func.strpos(authority, "@") + 1)  # after user:password@
    return sa.func.nullif(sa.func.lower(sa.func.split_part(host_port, ":", 1)), "")


def _column(runs: RunsTable, name: str, what: str) -> sa.Column:
    for column in runs.table.columns:
        if column.name == name:
            return column
    names = ", ".join(sorted(c.name for c in runs.table.columns))
    raise ConfigError(f"{what}: {name} is not a column of {runs.qualified_name}; use one of {names}")


def target_key(runs: RunsTable, target: str) -> sa.ColumnElement:
    """`TARGET`'s value for each row: the column's text, or the host of the URL it holds
    (`host(column)`). A column that is not text (a number, a date, JSON) is refused."""
    host = target.startswith("host(") and target.endswith(")")
    name = target[5:-1] if host else target
    column = _column(runs, name, f"TARGET={target}")
    if not isinstance(column.type, sa.String):
        raise ConfigError(
            f"TARGET={target}: {name} is of type {column.type}, not text; name a text or varchar column"
            + (" holding URLs" if host else "")
        )
    if host:
        return url_host(column)
    return column


def column_key(runs: RunsTable, name: str) -> sa.ColumnElement:
    """Any column's value as text, for `--by COLUMN`."""
    return sa.cast(_column(runs, name, f"--by {name}"), sa.Text)


def kind_key(runs: RunsTable) -> sa.ColumnElement:
    """COLUMN_MAP's kind as text; refused when the table maps no kind."""
    key = runs.kind_text()
    if key is None:
        raise ConfigError(
            "--by kind: the table maps no kind; set COLUMN_MAP=kind=COLUMN, or use --by target or --by COLUMN"
        )
    return key


def stats_by_group(q: ReportStatements, key: sa.ColumnElement, *, failing: bool = False) -> sa.Select:
    """Per value of `key` (NULL is a group too): runs started since `:sr_since`, stuck
    detections, retries ended (and succeeded), chains ended permanently failed, and the commonest
    failure pattern with its count, in the window; worst first, at most `:sr_limit` groups.

    Worst first: most chains permanently failed, then most retries failed, then most stuck
    detections, then most runs, then the group's name. With `failing`, only the groups where at
    least `:sr_min_retries` retries ended and more than `:sr_rate` of them failed, most failed
    retries first (the retry-failure alert's target). `q`: the table's statements (`RunQueries`)."""
    t, runs = q.t, q.runs
    since = sa.bindparam("sr_since", type_=t.c.started_at.type)
    handled = sa.or_(t.c.is_retry, t.c.failure_pattern.is_not(None))
    ended_in_window = sa.and_(handled, t.c.completed_at >= sa.bindparam("sr_since", type_=t.c.completed_at.type))
    retry_ended = q.retry_ended(t)
    permanent = sa.and_(*q.permanently_failed_where())
    rows = (
        sa.select(
            key.label("grp"),
            (t.c.started_at >= since).label("started"),
            ended_in_window.label("ended"),
            t.c.failure_pattern.label("pattern"),
            sa.and_(ended_in_window, retry_ended).label("retry_ended"),
            sa.and_(ended_in_window, retry_ended, runs.in_state(t.c.status, "completed")).label("retry_ok"),
            sa.case((ended_in_window, permanent), else_=sa.false()).label("permanent"),
        )
        .where(sa.or_(t.c.started_at >= since, ended_in_window))
        .cte("window_rows")
    )
    w = rows.c
    failed_retries = sa.func.count().filter(w.retry_ended, ~w.retry_ok)
    totals = sa.select(
        w.grp,
        sa.func.count().filter(w.started).label("runs"),
        sa.func.count().filter(w.ended, w.pattern == STUCK_PATTERN).label("stuck"),
        sa.func.count().filter(w.retry_ended).label("retries"),
        sa.func.count().filter(w.retry_ok).label("succeeded"),
        sa.func.count().filter(w.permanent).label("permanently_failed"),
        failed_retries.label("failed_retries"),
    ).group_by(w.grp)
    if failing:
        retries = sa.func.count().filter(w.retry_ended)
        totals = totals.having(
            retries >= sa.bindparam("sr_min_retries"), failed_retries > sa.bindparam("sr_rate") * retries
        )
    totals = totals.cte("totals")
    # The commonest pattern of the attempts that ended failed with one in the window (ties: by name).
    counted = (
        sa.select(w.grp, w.pattern, sa.func.count().label("n"))
        .where(w.ended, w.pattern.is_not(None))
        .group_by(w.grp, w.pattern)
        .subquery("patterns")
    )
    ranked = sa.select(
        counted.c.grp,
        counted.c.pattern,
        counted.c.n,
        sa.func.row_number()
        .over(partition_by=counted.c.grp, order_by=(counted.c.n.desc(), counted.c.pattern))
        .label("rank"),
    ).subquery("ranked")
    top = sa.select(ranked.c.grp, ranked.c.pattern, ranked.c.n).where(ranked.c.rank == 1).subquery("top")
    g = totals.c
    if failing:
        order = (g.failed_retries.desc(), g.retries.desc(), g.grp.nulls_last())
    else:
        order = (
            g.permanently_failed.desc(),
            g.failed_retries.desc(),
            g.stuck.desc(),
            g.runs.desc(),
            g.grp.nulls_last(),
        )
    return (
        sa.select(
            g.grp.label("group"),
            g.runs,
            g.stuck,
            g.retries,
            g.succeeded,
            g.permanently_failed,
            top.c.pattern.label("top_pattern"),
            sa.func.coalesce(top.c.n, 0).label("top_pattern_failures"),
        )
        .select_from(totals.outerjoin(top, g.grp.is_not_distinct_from(top.c.grp)))
        .order_by(*order)
        .limit(sa.bindparam("sr_limit"))
    )
