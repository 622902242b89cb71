"""Commands that sweep and process: check, process, fix."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from db.errors import EXIT_OK
from jobs.events import CHECKER, JOB_IDS, PROCESSOR, Event, RetryEnded, RetryStarted, Subscriber, SweepFinished
from jobs.status import job_run
from jobs.stuck import KEPT_RUNS, SweepResult, sweep_stuck_runs
from scheduler.cli import (
    EXECUTION,
    POLICY,
    all_option,
    cli,
    config_options,
    dry_run_option,
    json_option,
    open_runtime,
)
from scheduler.cli.interrupts import interruptible
from scheduler.cli.output import emit_json, listing, when

if TYPE_CHECKING:  # `process` and `fix` import them when they run: `check` starts without them
    from jobs.recovery import FixResult
    from jobs.retries import ProcessResult, RetryOutcome


def print_sweep(result: SweepResult, *, show_all: bool = False) -> None:
    if result.skipped:
        click.echo(f"Stuck-run sweep: nothing done, {result.skipped}.")
        return
    verb = "would fail" if result.dry_run else "failed"
    click.echo(
        f"Stuck-run sweep: {verb} {result.failed} stuck run(s): {result.retries_scheduled} retry(ies) scheduled, "
        f"{result.permanently_failed} permanently failed ({result.seconds:.2f}s)."
    )
    listing(
        ("RUN ID", "RUN", "ERROR MESSAGE", "RETRY DUE"),
        result.attempts,
        lambda a: (a.run_id, a.label, a.message, when(a.retry_due)),
        shrink=("RUN", "ERROR MESSAGE"),
        show_all=show_all,
        total=result.failed,
        how=f"--all, or: {result.listing_sql}" if result.listing_sql else "--all",
    )


def sweep_rows_kept(as_json: bool, show_all: bool) -> int | None:
    """How many runs' rows the sweep should hand back: all for JSON and --all, else a screenful's worth."""
    return None if as_json or show_all else KEPT_RUNS


def print_process(result: ProcessResult, *, listed: bool = False, show_all: bool = False) -> None:
    """The processor's result; `listed`: the executions were already printed as they happened."""
    if result.dry_run:
        click.echo(
            f"Retry processor: would supersede {len(result.superseded)}, would execute {len(result.due)} due retry(ies)."
        )
        listing(
            ("RUN ID", "RUN", "DUE"),
            result.due,
            lambda d: (d.run_id, d.label, when(d.due)),
            shrink=("RUN",),
            show_all=show_all,
        )
        if result.waiting:
            click.echo(f"Nothing starts now: {result.waiting.message}.")
    else:
        click.echo(f"Retry processor: {process_summary(result)} ({result.seconds:.2f}s).")
        if result.waiting:
            click.echo(f"{'Not started' if result.executed else 'Nothing started'}: {result.waiting.message}.")
        if not listed:
            listing(
                ("RUN ID", "RUN", "STATUS", "MESSAGE", "NEXT RETRY"),
                result.executed,
                lambda o: (o.run_id, o.label, o.status, o.message or "-", when(o.retry_due)),
                shrink=("RUN", "MESSAGE"),
                show_all=show_all,
            )
    listing(
        ("SUPERSEDED", "RUN", "MESSAGE"),
        result.superseded,
        lambda s: (s.run_id, s.label, s.message),
        shrink=("RUN", "MESSAGE"),
        show_all=show_all,
    )


def process_summary(result: ProcessResult) -> str:
    """`0 superseded, 1 executed (1 completed, 0 failed)`, and what went to the fleet: handed over,
    postponed, refused by the webhook. A pass that only delivered says nothing of executions."""
    ran = result.ran_here - sum(1 for o in result.executed if o.status == "released" and not o.delivered)
    fleet = result.handed_off or result.postponed or result.refused or result.failed_at_fleet
    parts = [f"{len(result.superseded)} superseded"]
    if ran or not fleet:
        parts.append(f"{ran} executed ({result.succeeded} completed, {result.failed} failed)")
    if result.released:
        parts.append(f"{result.released} put back to pending_retry")
    if result.handed_off:
        parts.append(f"{result.handed_off} handed to the fleet")
    if result.postponed:
        parts.append(f"{result.postponed} postponed (the fleet could not take them)")
    if result.refused:
        parts.append(f"{result.refused} refused by the webhook")
    if result.failed_at_fleet:
        parts.append(f"{result.failed_at_fleet} failed at the fleet (their chains continued)")
    return ", ".join(parts)


def progress_printer(as_json: bool, show_all: bool = False) -> Subscriber:
    """Prints each execution as it starts and ends (a retry can take an hour), and `fix`'s sweep
    before its pass; nothing for --json. Subscribed to the command's runtime."""

    def show(event: Event) -> None:
        if as_json:
            return
        if isinstance(event, SweepFinished):
            print_sweep(event.result, show_all=show_all)  # type: ignore[arg-type]
        elif isinstance(event, RetryStarted):
            click.echo(f"Executing {event.run.label} (run {event.run.id})…")
        elif isinstance(event, RetryEnded):
            outcome: RetryOutcome = event.outcome  # type: ignore[assignment]
            message = f" — {outcome.message}" if outcome.message else ""
            if outcome.status == "handed_off":
                click.echo(f"Handed {outcome.label} (run {outcome.run_id}) to the fleet")
            elif outcome.status == "postponed":
                click.echo(
                    f"Postponed {outcome.label} (run {outcome.run_id}){message}; delivered again at {when(outcome.retry_due)}"
                    " (no budget spent)"
                )
            else:
                due = f"; next retry due {when(outcome.retry_due)}" if outcome.retry_due else ""
                run = f"{outcome.label} (run {outcome.run_id})"
                if outcome.failed_at_fleet:
                    click.echo(f"Failed at the fleet: {run}{message}{due}")
                elif outcome.delivered and outcome.status == "failed":
                    click.echo(f"Refused by the webhook: {run}{message}{due}")
                elif outcome.delivered:
                    click.echo(f"Delivered {run}: {outcome.status}{message}")
                else:
                    click.echo(f"  {outcome.status} {run} after {outcome.seconds:.1f}s{message}{due}")

    return show


@cli.command()
@config_options(*POLICY, "ALERT_EVENTS")
@dry_run_option
@all_option
@json_option
@click.pass_context
def check(ctx: click.Context, dry_run: bool, show_all: bool, as_json: bool) -> int:
    """Fail runs stuck in 'running' and schedule their retries.

    \b
    Example:
      stuck-runs check --stuck-after 2h --dry-run
    """
    with interruptible() as interruption:
        with open_runtime(ctx) as rt, job_run(rt, (CHECKER,), dry_run=dry_run) as record:
            keep = sweep_rows_kept(as_json, show_all)
            result = sweep_stuck_runs(rt, dry_run=dry_run, stop=interruption.event, keep=keep)
            record(result)
        interruption.printing()
        emit_json(result) if as_json else print_sweep(result, show_all=show_all)
        interruption.report()
    return interruption.exit_code(EXIT_OK)


@cli.command()
@config_options(*POLICY, *EXECUTION, "ALERT_EVENTS")
@dry_run_option
@all_option
@json_option
@click.pass_context
def process(ctx: click.Context, dry_run: bool, show_all: bool, as_json: bool) -> int:
    """Supersede retries whose chain completed, then execute the due ones.

    \b
    Example:
      stuck-runs process --max-concurrent-retries 2
    """
    from jobs.retries import process_due_retries

    with interruptible() as interruption:
        with open_runtime(ctx, executes=not dry_run) as rt, job_run(rt, (PROCESSOR,), dry_run=dry_run) as record:
            rt.events.subscribe(progress_printer(as_json))
            result = process_due_retries(rt, dry_run=dry_run, stop=interruption.event)
            record(result)
        interruption.printing()
        emit_json(result) if as_json else print_process(result, listed=True, show_all=show_all)
        interruption.report()
    return interruption.exit_code(EXIT_OK)


def run_fix(ctx: click.Context, dry_run: bool, as_json: bool, show_all: bool = False) -> int:
    """`fix`, shared with scripts/fix_stuck_runs_with_retry.py."""
    from jobs.recovery import fix_stuck_runs_with_retry

    with interruptible() as interruption:
        with open_runtime(ctx, executes=not dry_run) as rt, job_run(rt, JOB_IDS, dry_run=dry_run) as record:
            rt.events.subscribe(progress_printer(as_json, show_all))
            policy = rt.settings.policy
            result: FixResult = fix_stuck_runs_with_retry(
                max_duration_hours=policy.stuck_after.total_seconds() / 3600,
                retry_delay_hours=policy.retry_delay.total_seconds() / 3600,
                max_retries=policy.max_retries,
                runtime=rt,
                dry_run=dry_run,
                stop=interruption.event,
                keep=sweep_rows_kept(as_json, show_all),
            )
            record({CHECKER: result.sweep, PROCESSOR: result.process})
        interruption.printing()
        if as_json:
            emit_json(result)
        else:
            print_process(result.process, listed=True, show_all=show_all)  # sweep and executions were printed live
        interruption.report()
    return interruption.exit_code(EXIT_OK)


@cli.command()
@config_options(*POLICY, *EXECUTION, "ALERT_EVENTS")
@dry_run_option
@all_option
@json_option
@click.pass_context
def fix(ctx: click.Context, dry_run: bool, show_all: bool, as_json: bool) -> int:
    """A stuck-run sweep, then a pass over due retries (what the manual script does).

    \b
    Example:
      stuck-runs fix --max-retries 4 --retry-delay 4h --dry-run
    """
    return run_fix(ctx, dry_run, as_json, show_all)
