"""Commands on one chain or many: retry (one run, or every failed chain matching filters), history."""

from __future__ import annotations

import threading

import click

from db.errors import EXIT_OK, EXIT_REFUSED, DueNowRefused, RetryRefused, UsageError
from jobs.control import read_pause
from jobs.due_now import DueNow, make_due_now
from jobs.manual import (
    RETRY_KINDS,
    BulkRetryResult,
    RetryCriteria,
    chain_history,
    parse_run_id,
    retry_matching,
    retry_run,
    run_retry_now,
)
from jobs.settings import parse_duration
from scheduler.cli import (
    EXECUTION,
    all_option,
    cli,
    config_options,
    dry_run_option,
    json_option,
    open_runtime,
)
from scheduler.cli.interrupts import interruptible
from scheduler.cli.output import emit_json, listing, table, when


@cli.command()
@click.argument("run_id", required=False)
@click.option("--reset-budget", is_flag=True, help="Give the chain a fresh retry budget (MAX_RETRIES more).")
@click.option(
    "--now",
    "execute_now",
    is_flag=True,
    help="Execute the retry here at once and wait for its outcome; a pending retry is made due now first.",
)
@click.option("--error-like", help="Bulk: error_message LIKE this (case-insensitive), e.g. '%503%'.")
@click.option("--search-query", help="Bulk: search_query LIKE this (case-insensitive).")
@click.option("--location-query", help="Bulk: location_query LIKE this (case-insensitive).")
@click.option("--since", help="Bulk: failed within this long, e.g. 24h or 7d.")
@click.option(
    "--status",
    "kind",
    type=click.Choice(RETRY_KINDS),
    default="failed",
    show_default=True,
    help="Bulk: every failed chain, the dead-lettered ones, or those the scraper failed itself.",
)
@click.option(
    "--limit", type=click.IntRange(1, 100_000), default=100, show_default=True, help="Bulk: at most this many."
)
@click.option("--spread", help="Bulk: spread the retries' due times evenly over this long, e.g. 2h.")
@config_options("MAX_RETRIES", "SCRAPE_RUNS_TABLE", *EXECUTION)
@dry_run_option
@all_option
@json_option
@click.pass_context
def retry(
    ctx: click.Context,
    run_id: str | None,
    reset_budget: bool,
    execute_now: bool,
    error_like: str | None,
    search_query: str | None,
    location_query: str | None,
    since: str | None,
    kind: str,
    limit: int,
    spread: str | None,
    dry_run: bool,
    show_all: bool,
    as_json: bool,
) -> int:
    """Retry a failed run now, or every failed chain matching filters.

    A run that is not its chain's latest attempt retries the chain's latest failed attempt.
    Refused: unknown runs, runs completed, running, pending a retry or cancelled, and chains
    whose budget is spent (unless --reset-budget). With --now, a chain's pending retry is made
    due now and executed here at once, its budget as it was.

    \b
    Examples:
      stuck-runs retry 3f1c2a7e-8d1b-4c55-9a57-2b0f5c1d9e11
      stuck-runs retry 3f1c2a7e-8d1b-4c55-9a57-2b0f5c1d9e11 --reset-budget --now
      stuck-runs retry --error-like '%503%' --since 24h --spread 2h --dry-run
      stuck-runs retry --status scraper --search-query 'Data %' --limit 50
    """
    criteria = RetryCriteria(
        error_like=error_like,
        search_query=search_query,
        location_query=location_query,
        since=parse_duration(since, "--since") if since else None,
        kind=kind,
        limit=limit,
    )
    # `--status failed` is the default, and a filter when given: `retry --status failed` retries every failed chain.
    bulk = criteria.given or ctx.get_parameter_source("kind") is click.core.ParameterSource.COMMANDLINE
    if run_id and (bulk or spread):
        raise UsageError("give a RUN_ID or bulk filters (--error-like, --since...), not both")
    if not run_id and not bulk:
        raise UsageError(
            "give a RUN_ID, or filters for a bulk retry (--error-like, --search-query, --since, --status...)"
        )
    if execute_now and (not run_id or dry_run):
        raise UsageError("--now executes one retry: give a RUN_ID and no --dry-run")
    spread_by = parse_duration(spread, "--spread") if spread else None
    with interruptible() as interruption:
        code = _retry(
            ctx, interruption, run_id, criteria, reset_budget, execute_now, spread_by, dry_run, as_json, show_all
        )
    return interruption.exit_code(code)


def _retry(
    ctx, interruption, run_id, criteria, reset_budget, execute_now, spread_by, dry_run, as_json, show_all
) -> int:
    """`retry`, single or bulk, once its arguments are checked."""
    outcome = None
    with open_runtime(ctx, executes=execute_now) as rt:
        wanted = parse_run_id(rt, run_id) if run_id else None
        if wanted is None:
            result: object = retry_matching(rt, criteria, reset_budget=reset_budget, spread=spread_by, dry_run=dry_run)
        elif dry_run:
            result = retry_run(rt, wanted, reset_budget=reset_budget, dry_run=True)
        else:
            paused = read_pause(rt) if execute_now else None
            if paused:
                raise RetryRefused(f"{paused.message}: run `stuck-runs resume` first, or retry without --now")
            result = _pending_made_due(rt, wanted) if execute_now and not reset_budget else None
            result = result or retry_run(rt, wanted, reset_budget=reset_budget)
            if execute_now and not interruption.event.is_set():
                outcome = run_retry_now(
                    rt, result.retry_id, lambda: _wait_for_slot(rt, interruption.event), interruption.event
                )
    interruption.printing()
    if as_json:
        made_due = isinstance(result, DueNow)
        emit_json(
            result
            if wanted is None or dry_run
            else {"due_now" if made_due else "scheduled": result, "outcome": outcome}
        )
    elif wanted is None:
        print_bulk(result, show_all)
    elif dry_run:
        click.echo(f"Would schedule: {result.message}, due now (dry run)")
    else:
        click.echo(result.message)
        if not isinstance(result, DueNow):
            click.echo(f"  retry {result.retry_id} of run {result.failed_run_id}, due {when(result.due)}")
        if outcome is not None and outcome.status == "handed_off":
            click.echo("Handed to the fleet: its scraper writes the outcome")
        elif outcome is not None:
            click.echo(f"Executed: {outcome.status}" + (f" — {outcome.message}" if outcome.message else ""))
    interruption.report()
    return EXIT_OK if outcome is None or outcome.status in ("completed", "handed_off") else EXIT_REFUSED


def _pending_made_due(rt, run_id) -> DueNow | None:
    """`--now` on a chain with a retry pending: that retry, made due now (executed next, like the
    retry `--now` schedules for a failed run); None when nothing of the chain is pending."""
    try:
        return make_due_now(rt, run_id)
    except DueNowRefused:
        return None  # a failed run to schedule, or a refusal retry_run words


def _wait_for_slot(rt, stop: threading.Event) -> None:
    click.echo(
        f"Every retry slot (MAX_CONCURRENT_RETRIES={rt.settings.max_concurrent_retries}) is busy; waiting…", err=True
    )
    stop.wait(rt.settings.dispatch_poll.total_seconds())


def print_bulk(result: BulkRetryResult, show_all: bool = False) -> None:
    dues = [s.due for s in result.scheduled]
    first, last = (when(min(dues)), when(max(dues))) if dues else (None, None)
    window = "" if not dues else f"; due {first}" if first == last else f"; due {first} to {last}"
    click.echo(f"{result.message}{window}.")
    if result.beyond_limit:
        click.echo(f"{result.beyond_limit}.")
    listing(
        ("RUN ID", "RUN", "ATTEMPT", "DUE", "RETRY ID"),
        result.scheduled,
        lambda s: (s.failed_run_id, s.label, f"{s.attempt}/{s.budget}", when(s.due), s.retry_id or "-"),
        shrink=("RUN",),
        show_all=show_all,
    )
    listing(
        ("SKIPPED", "RUN", "REASON"),
        result.skipped,
        lambda s: (s.run_id, s.label, s.reason),
        shrink=("RUN", "REASON"),
        show_all=show_all,
    )


@cli.command()
@click.argument("run_id")
@config_options("SCRAPE_RUNS_TABLE")
@json_option
@click.pass_context
def history(ctx: click.Context, run_id: str, as_json: bool) -> int:
    """Every attempt of a run's chain, oldest first.

    \b
    Example:
      stuck-runs history 3f1c2a7e-8d1b-4c55-9a57-2b0f5c1d9e11
    """
    with open_runtime(ctx) as rt:
        chain = chain_history(rt, parse_run_id(rt, run_id))
    if as_json:
        emit_json(chain)
        return EXIT_OK
    table(
        ("#", "RUN ID", "RUN", "STATUS", "STARTED", "COMPLETED", "NEXT RETRY", "PATTERN", "ERROR MESSAGE"),
        (
            (
                a.retry_count,
                a.id,
                a.label,
                a.status,
                when(a.started_at),
                when(a.completed_at),
                when(a.next_retry_at),
                a.failure_pattern or "-",
                a.error_message or "-",
            )
            for a in chain.attempts
        ),
        shrink=("RUN", "ERROR MESSAGE"),
    )
    click.echo(chain.summary)
    return EXIT_OK
