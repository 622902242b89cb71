"""Commands on runs: check, process, fix, retry, history."""

from __future__ import annotations

import click

from jobs.errors import EXIT_OK
from jobs.manual import chain_history, parse_run_id, retry_run
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
@click.argument("run_id")
@click.option("--reset-budget", is_flag=True, help="Give the chain a fresh retry budget.")
@config_options("MAX_RETRIES", "SCRAPE_RUNS_TABLE")
@json_option
@click.pass_context
def retry(ctx: click.Context, run_id: str, reset_budget: bool, as_json: bool) -> int:
    """Schedule a retry of a failed run, due now.

    \b
    Example:
      stuck-runs retry 3f1c2a7e-8d1b-4c55-9a57-2b0f5c1d9e11
    """
    wanted = parse_run_id(run_id)
    with open_runtime(ctx) as rt:
        result = retry_run(rt, wanted, reset_budget=reset_budget)
    if as_json:
        emit_json(result)
    else:
        click.echo(result.message)
        click.echo(f"  retry {result.retry_id} of run {result.failed_run_id}, due {when(result.due)}")
    return EXIT_OK


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
        ("#", "RUN ID", "RUN", "STATUS", "STARTED", "COMPLETED", "NEXT RETRY", "ERROR MESSAGE"),
        (
            (
                a.retry_count,
                a.id,
                short(a.label, 45),
                a.status,
                when(a.started_at),
                when(a.completed_at),
                when(a.next_retry_at),
                short(a.error_message, 70),
            )
            for a in chain.attempts
        ),
    )
    click.echo(f"Total attempts: {len(chain.attempts)} · final status: {chain.final_status}")
    return EXIT_OK
