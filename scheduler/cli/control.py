"""Commands that stop work: cancel a pending retry, pause and resume every retry."""

from __future__ import annotations

import click

from db.errors import EXIT_OK, UsageError
from jobs.control import BulkCancelResult, cancel_matching, cancel_run, pause_retries, resume_retries
from jobs.manual import RetryCriteria, parse_run_id
from jobs.settings import parse_duration
from scheduler.cli import all_option, cli, config_options, dry_run_option, json_option, open_runtime
from scheduler.cli.output import emit_json, listing


@cli.command()
@click.argument("run_id", required=False)
@click.option("--error-like", help="Bulk: the retried attempt's error LIKE this (case-insensitive), e.g. '%503%'.")
@click.option("--search-query", help="Bulk: search_query LIKE this (case-insensitive).")
@click.option("--location-query", help="Bulk: location_query LIKE this (case-insensitive).")
@click.option("--since", help="Bulk: the retried attempt ended within this long, e.g. 24h.")
@click.option(
    "--limit", type=click.IntRange(1, 100_000), default=100, show_default=True, help="Bulk: at most this many."
)
@click.option("--running", is_flag=True, help="Bulk: cancel the matching running retries too.")
@config_options("SCRAPE_RUNS_TABLE", "DISPATCH_POLL")
@dry_run_option
@all_option
@json_option
@click.pass_context
def cancel(
    ctx: click.Context,
    run_id: str | None,
    error_like: str | None,
    search_query: str | None,
    location_query: str | None,
    since: str | None,
    limit: int,
    running: bool,
    dry_run: bool,
    show_all: bool,
    as_json: bool,
) -> int:
    """Cancel a chain's pending or running retry, or every pending retry matching filters.

    The retry becomes `cancelled` ("Cancelled by operator"), spends no budget and is not retried;
    the chain is over. A running retry is stopped by the process executing it, on any host, within
    DISPATCH_POLL (its process group: SIGTERM, then SIGKILL after CANCEL_TIMEOUT), or by the engine
    it was handed to; one handed to a webhook or a queue is cancelled in the row only. A bulk cancel
    touches running retries only with --running. Refused when nothing of the chain is pending or
    running.

    \b
    Examples:
      stuck-runs cancel 3f1c2a7e-8d1b-4c55-9a57-2b0f5c1d9e11
      stuck-runs cancel --error-like '%403%' --since 24h --dry-run
      stuck-runs cancel --search-query '%Nurse%' --running
    """
    criteria = RetryCriteria(
        error_like=error_like,
        search_query=search_query,
        location_query=location_query,
        since=parse_duration(since, "--since") if since else None,
        limit=limit,
    )
    if run_id and criteria.given:
        raise UsageError("give a RUN_ID or bulk filters (--error-like, --since...), not both")
    if run_id and running:
        raise UsageError("--running is for a bulk cancel: `cancel RUN_ID` cancels the chain's running retry as it is")
    if not run_id and not criteria.given:
        raise UsageError("give a RUN_ID, or filters for a bulk cancel (--error-like, --search-query, --since...)")
    with open_runtime(ctx) as rt:
        if run_id:
            done = cancel_run(rt, parse_run_id(rt, run_id), dry_run=dry_run)
            result = BulkCancelResult((done,), dry_run)
        else:
            result = cancel_matching(rt, criteria, dry_run=dry_run, running=running)
    if as_json:
        emit_json(result)
        return EXIT_OK
    if run_id and done.running:
        click.echo(f"{done.message}.")
        return EXIT_OK
    if run_id:
        verb = "Would cancel" if dry_run else "Cancelled"
        click.echo(f"{verb} {len(result.cancelled)} pending retry(ies).")
    else:
        click.echo(f"{result.message}.")
        if result.beyond_limit:
            click.echo(f"{result.beyond_limit}.")
    listing(
        ("RETRY ID", "RUN", "ATTEMPT", "CANCELLED"),
        result.cancelled,
        lambda c: (c.retry_id, c.label, f"{c.attempt}/{c.budget}", "yes" if c.cancelled else "no"),
        shrink=("RUN",),
        show_all=show_all,
    )
    listing(("SKIPPED", "RUN", "REASON"), result.skipped, lambda s: (s.retry_id, s.label, s.reason), shrink=("RUN",))
    return EXIT_OK


@cli.command()
@click.option("--for", "duration", help="End the pause by itself after this long, e.g. 4h (default: until resumed).")
@config_options("SCRAPE_RUNS_TABLE")
@json_option
@click.pass_context
def pause(ctx: click.Context, duration: str | None, as_json: bool) -> int:
    """Stop every process from starting retries; sweeps go on, retries stay scheduled.

    \b
    Examples:
      stuck-runs pause --for 4h     # the site is down for maintenance
      stuck-runs pause              # until `stuck-runs resume`
    """
    length = parse_duration(duration, "--for") if duration is not None else None  # `--for ''`: an error
    with open_runtime(ctx) as rt:
        state = pause_retries(rt, length)
    if as_json:
        emit_json(state)
    else:
        click.echo(f"{state.message}. `stuck-runs resume` ends it.")
    return EXIT_OK


@cli.command()
@config_options("SCRAPE_RUNS_TABLE")
@json_option
@click.pass_context
def resume(ctx: click.Context, as_json: bool) -> int:
    """End a pause: due retries start again at once."""
    with open_runtime(ctx) as rt:
        ended = resume_retries(rt)
    if as_json:
        emit_json({"resumed": ended is not None, "pause": ended})
    else:
        click.echo("Retries resumed." if ended else "Retries were not paused; nothing changed.")
    return EXIT_OK
