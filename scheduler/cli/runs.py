"""Commands on runs: check, process, fix, retry, history."""

from __future__ import annotations

import time

import click

from jobs.config import parse_duration
from jobs.errors import EXIT_OK, EXIT_REFUSED, UsageError
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
from jobs.recovery import FixResult, fix_stuck_runs_with_retry
from jobs.retries import ProcessResult, process_due_retries
from jobs.stuck import SweepResult, sweep_stuck_runs
from scheduler.cli import EXECUTION, POLICY, cli, config_options, dry_run_option, json_option, open_runtime
from scheduler.cli.output import emit_json, short, table, when


def print_sweep(result: SweepResult) -> None:
    if result.skipped:
        click.echo(f"Stuck-run sweep: nothing done, {result.skipped}.")
        return
    verb = "would fail" if result.dry_run else "failed"
    click.echo(
        f"Stuck-run sweep: {verb} {result.failed} stuck run(s): {result.retries_scheduled} retry(ies) scheduled, "
        f"{result.permanently_failed} permanently failed ({result.seconds:.2f}s)."
    )
    table(
        ("RUN ID", "RUN", "ERROR MESSAGE", "RETRY DUE"),
        ((a.run_id, short(a.label, 50), a.message, when(a.retry_due)) for a in result.attempts),
    )


def print_process(result: ProcessResult) -> None:
    if result.dry_run:
        click.echo(
            f"Retry processor: would supersede {len(result.superseded)}, would execute {len(result.due)} due retry(ies)."
        )
        table(("RUN ID", "RUN", "DUE"), ((d.run_id, short(d.label, 50), when(d.due)) for d in result.due))
    else:
        click.echo(
            f"Retry processor: {len(result.superseded)} superseded, {len(result.executed)} executed "
            f"({result.succeeded} completed, {result.failed} failed) ({result.seconds:.2f}s)."
        )
        table(
            ("RUN ID", "RUN", "STATUS", "MESSAGE", "NEXT RETRY"),
            ((o.run_id, short(o.label, 50), o.status, o.message or "-", when(o.retry_due)) for o in result.executed),
        )
    table(("SUPERSEDED", "RUN", "MESSAGE"), ((s.run_id, short(s.label, 50), s.message) for s in result.superseded))


@cli.command()
@config_options(*POLICY)
@dry_run_option
@json_option
@click.pass_context
def check(ctx: click.Context, dry_run: bool, as_json: bool) -> int:
    """Fail runs stuck in 'running' and schedule their retries.

    \b
    Example:
      stuck-runs check --stuck-after 2h --dry-run
    """
    with open_runtime(ctx) as rt:
        result = sweep_stuck_runs(rt, dry_run=dry_run)
    emit_json(result) if as_json else print_sweep(result)
    return EXIT_OK


@cli.command()
@config_options(*POLICY, *EXECUTION)
@dry_run_option
@json_option
@click.pass_context
def process(ctx: click.Context, dry_run: bool, as_json: bool) -> int:
    """Supersede retries whose chain completed, then execute the due ones.

    \b
    Example:
      stuck-runs process --max-concurrent-retries 2
    """
    with open_runtime(ctx) as rt:
        result = process_due_retries(rt, dry_run=dry_run)
    emit_json(result) if as_json else print_process(result)
    return EXIT_OK


def run_fix(ctx: click.Context, dry_run: bool, as_json: bool) -> int:
    """`fix`, shared with scripts/fix_stuck_runs_with_retry.py."""
    with open_runtime(ctx) as rt:
        policy = rt.settings.policy
        result: FixResult = fix_stuck_runs_with_retry(
            max_duration_hours=policy.stuck_after.total_seconds() / 3600,
            retry_delay_hours=policy.retry_delay.total_seconds() / 3600,
            max_retries=policy.max_retries,
            runtime=rt,
            dry_run=dry_run,
        )
    if as_json:
        emit_json(result)
    else:
        print_sweep(result.sweep)
        print_process(result.process)
    return EXIT_OK


@cli.command()
@config_options(*POLICY, *EXECUTION)
@dry_run_option
@json_option
@click.pass_context
def fix(ctx: click.Context, dry_run: bool, as_json: bool) -> int:
    """A stuck-run sweep, then a pass over due retries (what the manual script does).

    \b
    Example:
      stuck-runs fix --max-retries 4 --retry-delay 4h --dry-run
    """
    return run_fix(ctx, dry_run, as_json)


@cli.command()
@click.argument("run_id", required=False)
@click.option("--reset-budget", is_flag=True, help="Give the chain a fresh retry budget (MAX_RETRIES more).")
@click.option("--now", "execute_now", is_flag=True, help="Execute the retry here at once and wait for its outcome.")
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
    as_json: bool,
) -> int:
    """Retry a failed run now, or every failed chain matching filters.

    A run that is not its chain's latest attempt retries the chain's latest failed attempt.
    Refused: unknown runs, runs completed, running, pending a retry or cancelled, and chains
    whose budget is spent (unless --reset-budget).

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
    if run_id and (criteria.given or spread):
        raise UsageError("give a RUN_ID or bulk filters (--error-like, --since...), not both")
    if not run_id and not criteria.given:
        raise UsageError(
            "give a RUN_ID, or filters for a bulk retry (--error-like, --search-query, --since, --status...)"
        )
    if execute_now and (not run_id or dry_run):
        raise UsageError("--now executes one retry: give a RUN_ID and no --dry-run")
    spread_by = parse_duration(spread, "--spread") if spread else None
    wanted = parse_run_id(run_id) if run_id else None
    with open_runtime(ctx) as rt:
        if wanted is None:
            bulk = retry_matching(rt, criteria, reset_budget=reset_budget, spread=spread_by, dry_run=dry_run)
            emit_json(bulk) if as_json else print_bulk(bulk)
            return EXIT_OK
        if dry_run:
            plan = retry_run(rt, wanted, reset_budget=reset_budget, dry_run=True)
            emit_json(plan) if as_json else click.echo(f"Would schedule: {plan.message}, due now (dry run)")
            return EXIT_OK
        if execute_now:
            _ = rt.executor  # refuse before scheduling if nothing could execute it
        scheduled = retry_run(rt, wanted, reset_budget=reset_budget)
        outcome = None
        if execute_now:
            outcome = run_retry_now(rt, scheduled.retry_id, lambda: _wait_for_slot(rt))
    if as_json:
        emit_json({"scheduled": scheduled, "outcome": outcome})
    else:
        click.echo(scheduled.message)
        click.echo(f"  retry {scheduled.retry_id} of run {scheduled.failed_run_id}, due {when(scheduled.due)}")
        if outcome is not None:
            click.echo(f"Executed: {outcome.status}" + (f" — {outcome.message}" if outcome.message else ""))
    return EXIT_OK if outcome is None or outcome.status == "completed" else EXIT_REFUSED


def _wait_for_slot(rt) -> None:
    click.echo(
        f"Every retry slot (MAX_CONCURRENT_RETRIES={rt.settings.max_concurrent_retries}) is busy; waiting…", err=True
    )
    time.sleep(rt.settings.dispatch_poll.total_seconds())


def print_bulk(result: BulkRetryResult) -> None:
    verb = "Would retry" if result.dry_run else "Retried"
    dues = [s.due for s in result.scheduled]
    window = f", due {when(min(dues))} to {when(max(dues))}" if dues else ""
    click.echo(f"{verb} {len(result.scheduled)} failed chain(s){window}; {len(result.skipped)} skipped.")
    table(
        ("RUN ID", "RUN", "ATTEMPT", "DUE", "RETRY ID"),
        (
            (s.failed_run_id, short(s.label, 45), f"{s.attempt}/{s.budget}", when(s.due), s.retry_id or "-")
            for s in result.scheduled
        ),
    )
    table(("SKIPPED", "RUN", "REASON"), ((s.run_id, short(s.label, 45), short(s.reason, 90)) for s in result.skipped))


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
    wanted = parse_run_id(run_id)
    with open_runtime(ctx) as rt:
        chain = chain_history(rt, wanted)
    if as_json:
        emit_json(chain)
        return EXIT_OK
    table(
        ("#", "RUN ID", "RUN", "STATUS", "STARTED", "COMPLETED", "NEXT RETRY", "PATTERN", "ERROR MESSAGE"),
        (
            (
                a.retry_count,
                a.id,
                short(a.label, 45),
                a.status,
                when(a.started_at),
                when(a.completed_at),
                when(a.next_retry_at),
                a.failure_pattern or "-",
                short(a.error_message, 70),
            )
            for a in chain.attempts
        ),
    )
    click.echo(f"Total attempts: {len(chain.attempts)} · final status: {chain.final_status}")
    return EXIT_OK
