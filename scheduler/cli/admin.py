"""Commands that run or set up the tool: migrate, daemon, demo."""

from __future__ import annotations

import click

from db.engine import make_engine
from db.errors import EXIT_OK, EXIT_REFUSED, UsageError
from db.migrate import MigrationStopped, head_revision, migrate, script_for_dba
from jobs.manual import chain_history
from jobs.status import handed_off_message, read_status, untimed_message
from scheduler.cli import ALERTS, EXECUTION, POLICY, cli, config_options, json_option, load_settings, open_runtime
from scheduler.cli.interrupts import interruptible
from scheduler.cli.output import emit_json, table, when


@cli.command("migrate")
@click.option(
    "--sql",
    "as_sql",
    is_flag=True,
    help="Print the DDL for a DBA instead of running it: what the database lacks, or (no database) all of it.",
)
@click.option(
    "--extend-check",
    is_flag=True,
    help="Extend a CHECK constraint on status with the values stuck-runs writes (NOT VALID, then VALIDATE).",
)
@config_options("SCRAPE_RUNS_TABLE", "HEARTBEAT_COLUMN")
@click.pass_context
def migrate_command(ctx: click.Context, as_sql: bool, extend_check: bool) -> int:
    """Add the retry columns, status values and indexes to the runs table (idempotent).

    A table the other commands would refuse is refused before anything changes.

    \b
    Examples:
      stuck-runs migrate
      stuck-runs migrate --sql > stuck-runs.sql
      stuck-runs migrate --extend-check
    """
    settings = load_settings(ctx)
    if as_sql:
        script = script_for_dba(settings.database_url, settings.table, settings.heartbeat_column, settings.layout)
        click.echo(script, nl=False)
        return EXIT_OK
    engine = make_engine(settings.require_database_url(), role="migrate", pool_size=1)
    with interruptible("finishing the current statement") as interruption:
        try:
            result = migrate(
                engine,
                settings.table,
                settings.heartbeat_column,
                settings.layout,
                extend_check=extend_check,
                stop=interruption.event,
            )
        except MigrationStopped as exc:
            click.echo(
                f"stuck-runs: migrate stopped between two statements; done: {exc}. Run `stuck-runs migrate` "
                "again to finish (every step is idempotent).",
                err=True,
            )
            return interruption.exit_code(EXIT_REFUSED)
        finally:
            engine.dispose()
    if result.before != result.after:
        click.echo(f"Migrated {result.table} from revision {result.before or 'none'} to {result.after}.")
    if result.added:
        done = "Also" if result.before != result.after else f"Completed {result.table} for its mapping:"
        click.echo(f"{done} added {', '.join(result.added)}.")
    if not result.changed:
        click.echo(f"{result.table} is already at revision {head_revision()}; nothing changed.")
    return EXIT_OK


@cli.command("sql")
@click.argument("kind", type=click.Choice(["pending", "history"]))
@click.argument("run_id", required=False)
@config_options("SCRAPE_RUNS_TABLE")
@click.pass_context
def sql_command(ctx: click.Context, kind: str, run_id: str | None) -> int:
    """Print the monitoring queries (pending, history RUN_ID) in the table's names.

    On a table in the default shape they are the README's (Monitoring with SQL), verbatim; on
    another, the same questions in its columns and status values, ready for psql.

    \b
    Examples:
      stuck-runs sql pending
      stuck-runs sql history 42 | psql "$DATABASE_URL"
    """
    if (kind == "history") != (run_id is not None):
        raise UsageError("give a RUN_ID with `sql history`, and none with `sql pending`")
    with open_runtime(ctx) as rt:
        # SPEC §9's history query takes the chain's first run: a retry's id is followed to it.
        wanted = chain_history(rt, rt.runs.parse_id(run_id)).root_id if run_id is not None else None
        click.echo(rt.queries.monitoring_sql(kind, wanted))
    return EXIT_OK


@cli.command()
@config_options("STUCK_AFTER", "HEARTBEAT_COLUMN", "SCRAPE_RUNS_TABLE")
@json_option
@click.pass_context
def status(ctx: click.Context, as_json: bool) -> int:
    """Each job's last and next run, live daemons, and where the runs stand.

    A job's last run is the latest from any host and any entry point: the daemon,
    check/process/fix, or the manual script.

    \b
    Example:
      stuck-runs status
    """
    with open_runtime(ctx) as rt:
        report = read_status(rt)
        hands_off = rt.settings.hands_off
    if as_json:
        emit_json(report)
        return EXIT_OK
    if report.daemons:
        for d in report.daemons:
            age = (report.checked_at - d.heartbeat_at).total_seconds()
            click.echo(f"Daemon alive: {d.host}:{d.pid}, up since {when(d.started_at)}, heartbeat {age:.0f}s ago")
    else:
        click.echo("No daemon alive (none has sent a heartbeat in the last minute).")
    table(
        ("JOB", "LAST RUN", "ON", "OUTCOME", "COUNTS", "NEXT RUN"),
        (
            (
                j.job_id,
                when(j.last_started),
                f"{j.host}:{j.pid}{'' if j.by_daemon else f' ({j.via})'}" if j.host else "-",
                j.outcome or "never ran",
                j.error or ", ".join(f"{k}={v}" for k, v in (j.counts or {}).items()) or "-",
                when(j.next_run),
            )
            for j in report.jobs
        ),
        shrink=("COUNTS",),  # cut between `key=value` items, never inside one
    )
    runs = report.runs
    click.echo(
        f"Runs: {runs.running} running ({runs.stuck} stuck) · {runs.pending_retry} pending_retry "
        f"(next due {when(runs.next_due)}) · permanently failed ({runs.permanently_failed_window}): "
        f"{runs.permanently_failed} (chains ended failed, no retry coming)"
    )
    if runs.fleet_shown(hands_off):
        click.echo(f"Handed to the fleet: {handed_off_message(runs.handed_off_queued, runs.handed_off_running)}")
    if runs.untimed:
        click.echo(f"Warning: {untimed_message(runs.untimed)}; `stuck-runs doctor` says how to fix them.")
    if report.pause:
        click.echo(f"{report.pause.message}: no retry starts; `stuck-runs resume` ends it.")
    if report.waiting:
        click.echo(f"Waiting: {report.waiting.message}.")
    return EXIT_OK


@cli.command()
@config_options(*POLICY, *EXECUTION, "CHECK_INTERVAL", "PROCESS_INTERVAL", "DISPATCH_POLL", "METRICS_PORT", *ALERTS)
@click.pass_context
def daemon(ctx: click.Context) -> int:
    """Run the stuck-run checker (hourly) and the retry processor (every 30 min) until SIGTERM.

    \b
    Example:
      stuck-runs daemon --check-interval 1h --process-interval 30m
    """
    from scheduler.daemon import run_daemon

    run_daemon(load_settings(ctx))
    return EXIT_OK


@cli.command()
@click.option(
    "--keep",
    is_flag=True,
    help="Leave the embedded PostgreSQL running with the demo's data; print how to connect and how to stop it.",
)
def demo(keep: bool) -> int:
    """Run the whole story on an embedded PostgreSQL, a virtual day in about 20 seconds.

    \b
    Example:
      stuck-runs demo
    """
    from scheduler.demo import run_demo

    return run_demo(keep=keep)
