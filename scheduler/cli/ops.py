"""Commands for looking after the tool: stats, dlq, doctor."""

from __future__ import annotations

from datetime import timedelta

import click

from db.errors import EXIT_OK, EXIT_REFUSED, EXIT_USAGE
from jobs.dead_letters import get_dead_letter, list_dead_letters, purge_dead_letters, requeue
from jobs.doctor import run_checks
from jobs.settings import parse_duration, settings_from_environment
from jobs.stats import HERE, retry_stats
from jobs.status import handed_off_message
from jobs.targets import GroupedStats, stats_by
from scheduler.cli import EXECUTION, POLICY, cli, config_options, json_option, open_runtime
from scheduler.cli.output import emit_json, table, when
from scheduler.documents import json_text
from scheduler.logs import configure_logging


def percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def ran_where(how: str) -> str:
    """How a retry ran, as `stats` shows it: `here`, or handed to the fleet, `fleet (webhook)`."""
    return how if how == HERE else f"fleet ({how})"


@cli.command()
@click.option("--since", default="7d", show_default=True, help="The window: attempts that ended within it.")
@click.option("--by", help="Per group, worst first: target (TARGET), kind (COLUMN_MAP's kind) or a COLUMN.")
@click.option("--limit", type=click.IntRange(1, 10_000), default=20, show_default=True, help="Groups shown with --by.")
@config_options("SCRAPE_RUNS_TABLE", "TARGET")
@json_option
@click.pass_context
def stats(ctx: click.Context, since: str, by: str | None, limit: int, as_json: bool) -> int:
    """Retry metrics: totals, success rates, retries per chain, by failure pattern and attempt.

    Every retry count is of the retries that ended (completed or failed) in the window; those
    pending, running or handed to the fleet now, and those cancelled before they ran, are shown
    beside them. Where retries are handed to the fleet (README: Handing retries to the fleet), a RAN table splits them by how
    they ran: here, or at the fleet by webhook or queue (the outcome the scraper wrote).

    With --by, per target, kind or column instead: runs, stuck, retries ended, their success
    rate, chains permanently failed and the commonest failure pattern, worst first.

    \b
    Examples:
      stuck-runs stats --since 30d
      stuck-runs stats --by target --since 24h
    """
    window = parse_duration(since, "--since")
    if by is not None:
        with open_runtime(ctx) as rt:
            grouped = stats_by(rt, by, window, limit)
        if as_json:
            emit_json(grouped)
        else:
            print_groups(grouped)
        return EXIT_OK
    with open_runtime(ctx) as rt:
        result = retry_stats(rt, window)
        fleet = result.fleet_shown(rt.settings.hands_off)
    if as_json:
        emit_json(result)
        return EXIT_OK
    click.echo(f"Since {when(result.since)}, retries that ended (completed or failed):")
    click.echo(
        f"  retries ended {result.retries} · succeeded {result.succeeded} ({percent(result.success_rate)}) · "
        f"failed {result.failed} · chains {result.chains} · {result.retries_per_chain or 0:.2f} retries per chain"
    )
    click.echo(
        f"  not counted above: {result.pending} pending and {result.running} running now, "
        f"{result.cancelled} cancelled before they ran"
    )
    if fleet:
        queued, running = result.handed_off_queued, result.handed_off_running
        click.echo(f"  handed to the fleet, not ended yet (nor counted above): {handed_off_message(queued, running)}")
    click.echo(
        f"  stuck detections {result.stuck_detections} · permanently failed {result.permanently_failed} "
        "(chains whose last attempt ended failed in the window, no retry coming)"
    )
    if fleet:
        table(
            ("RAN", "RETRIES ENDED", "SUCCEEDED", "SUCCESS RATE"),
            ((ran_where(h.how), h.retries, h.succeeded, percent(h.success_rate)) for h in result.by_how),
        )
    table(
        ("ATTEMPT", "RETRIES ENDED", "SUCCEEDED", "SUCCESS RATE"),
        ((a.attempt, a.retries, a.succeeded, percent(a.success_rate)) for a in result.by_attempt),
    )
    table(
        ("FAILURE PATTERN", "FAILURES", "RETRIES ENDED", "RETRIES SUCCEEDED"),
        ((p.pattern or "(unclassified)", p.failures, p.retries, p.retries_succeeded) for p in result.by_pattern),
    )
    return EXIT_OK


def print_groups(grouped: GroupedStats) -> None:
    """`stats --by`'s table: one line per group, worst first."""
    click.echo(f"Since {when(grouped.since)}, by {grouped.key}, worst first ({grouped.order}):")
    if not grouped.groups:
        click.echo("  no runs in the window")
    table(
        (grouped.by.upper(), "RUNS", "STUCK", "RETRIES ENDED", "SUCCESS RATE", "PERM. FAILED", "COMMONEST FAILURE"),
        (
            (
                "(none)" if g.group is None else g.group,
                g.runs,
                g.stuck,
                g.retries,
                percent(g.success_rate),
                g.permanently_failed,
                f"{g.top_pattern} ({g.top_pattern_failures})" if g.top_pattern else "-",
            )
            for g in grouped.groups
        ),
        shrink=(grouped.by.upper(), "COMMONEST FAILURE"),
    )


@cli.group()
def dlq() -> None:
    """The dead-letter queue: chains that ended permanently failed.

    \b
    Examples:
      stuck-runs dlq list --since 7d
      stuck-runs dlq show 42
      stuck-runs dlq requeue 42
      stuck-runs dlq purge --older-than 30d
    """


@dlq.command("list")
@click.option("--limit", type=click.IntRange(1, 100_000), default=50, show_default=True)
@click.option("--pattern", help="Only this failure pattern (not_found, stuck...).")
@click.option("--since", help="Only those created within this long, e.g. 7d.")
@click.option("--all", "include_requeued", is_flag=True, help="Include the requeued ones.")
@config_options("SCRAPE_RUNS_TABLE")
@json_option
@click.pass_context
def dlq_list(
    ctx: click.Context, limit: int, pattern: str | None, since: str | None, include_requeued: bool, as_json: bool
) -> int:
    """List dead letters, newest first.

    \b
    Example:
      stuck-runs dlq list --pattern not_found
    """
    window = parse_duration(since, "--since") if since else None
    with open_runtime(ctx) as rt:
        letters = list_dead_letters(rt, limit=limit, pattern=pattern, since=window, include_requeued=include_requeued)
    if as_json:
        emit_json(letters)
        return EXIT_OK
    if not letters:
        click.echo("No dead letters.")
    table(
        ("#", "RUN ID", "CREATED", "ATTEMPTS", "PATTERN", "LAST ERROR", "REQUEUED"),
        (
            (
                d.id,
                d.run_id,
                when(d.created_at),
                f"{d.attempts} (budget {d.budget})",
                d.pattern,
                d.last_error or "-",
                when(d.requeued_at),
            )
            for d in letters
        ),
        shrink=("LAST ERROR",),
    )
    return EXIT_OK


@dlq.command("show")
@click.argument("letter")
@config_options("SCRAPE_RUNS_TABLE")
@json_option
@click.pass_context
def dlq_show(ctx: click.Context, letter: str, as_json: bool) -> int:
    """Everything about one dead letter (by number or run id): error, stderr or traceback, inputs.

    \b
    Example:
      stuck-runs dlq show 42
      stuck-runs dlq show run:1187            # by the run's id
    """
    with open_runtime(ctx) as rt:
        found = get_dead_letter(rt, letter)
    if as_json:
        emit_json(found)
        return EXIT_OK
    for name, value in (
        ("dead letter", found.id),
        ("run", found.run_id),
        ("chain", found.chain_id),
        ("created", when(found.created_at)),
        ("attempts", f"{found.attempts} (budget {found.budget} retries)"),
        ("pattern", found.pattern),
        ("last error", found.last_error),
        ("requeued", f"{when(found.requeued_at)} as run {found.requeued_run_id}" if found.requeued_at else "no"),
    ):
        click.echo(f"{name:>12}: {value}")
    click.echo("      inputs:")
    for key, value in sorted(found.inputs.items()):
        click.echo(f"        {key} = {json_text(value)}")
    if found.detail:
        click.echo("      detail:")
        for line in found.detail.rstrip().splitlines():
            click.echo(f"        {line}")
    return EXIT_OK


@dlq.command("requeue")
@click.argument("letter")
@config_options("MAX_RETRIES", "SCRAPE_RUNS_TABLE")
@json_option
@click.pass_context
def dlq_requeue(ctx: click.Context, letter: str, as_json: bool) -> int:
    """Retry a dead-lettered chain now, with a new budget of MAX_RETRIES retries.

    \b
    Example:
      stuck-runs dlq requeue 42
    """
    with open_runtime(ctx) as rt:
        scheduled = requeue(rt, letter)
    if as_json:
        emit_json(scheduled)
    else:
        click.echo(f"Requeued: {scheduled.message}")
        click.echo(f"  retry {scheduled.retry_id} of run {scheduled.failed_run_id}, due {when(scheduled.due)}")
    return EXIT_OK


@dlq.command("purge")
@click.option("--older-than", required=True, help="Remove dead letters created before this long ago, e.g. 30d.")
@config_options("SCRAPE_RUNS_TABLE")
@json_option
@click.pass_context
def dlq_purge(ctx: click.Context, older_than: str, as_json: bool) -> int:
    """Remove old dead letters (the runs themselves stay in the table).

    \b
    Example:
      stuck-runs dlq purge --older-than 30d
    """
    age = parse_duration(older_than, "--older-than")
    with open_runtime(ctx) as rt:
        removed = purge_dead_letters(rt, age)
    if as_json:
        emit_json({"removed": removed, "older_than_seconds": age.total_seconds()})
    else:
        click.echo(f"Removed {removed} dead letter(s) older than {_age(age)}.")
    return EXIT_OK


def _age(age: timedelta) -> str:
    return f"{age.days}d" if age.days and not age.seconds else str(age)


@cli.command()
@config_options(*POLICY, *EXECUTION)
@json_option
@click.pass_context
def doctor(ctx: click.Context, as_json: bool) -> int:
    """Check configuration, connectivity, migration, indexes, clock skew, executor, privileges.

    \b
    Example:
      stuck-runs doctor
    """
    from jobs.clock import SystemClock

    configure_logging("WARNING")
    flags = ctx.meta.get("stuck_runs.flags", {})
    checks = run_checks(lambda: settings_from_environment(flags), SystemClock().now)
    if as_json:
        emit_json(checks)
    else:
        for check in checks:
            mark = ("!" if check.warning else "✓") if check.ok else "✗"
            fix = f" → {check.fix}" if check.fix else ""
            click.echo(f"{mark} {check.name}: {check.detail}{fix}")
    if checks and checks[0].name == "configuration" and not checks[0].ok:
        return EXIT_USAGE  # a setting is wrong: a usage error, as for every other command
    return EXIT_OK if all(c.ok for c in checks) else EXIT_REFUSED
