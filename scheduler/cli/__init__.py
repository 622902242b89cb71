"""`stuck-runs`: the command line. Operator errors become one line and an exit code here, and
only here; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import atexit
import gc
import importlib
import json
import os
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import click

from db.errors import EXIT_INTERRUPTED, EXIT_OK, OperatorError
from jobs.settings import BY_ENV, FLAG_FOR, Settings, settings_from_environment
from scheduler.cli.interrupts import Interrupted

if TYPE_CHECKING:
    from jobs.runtime import Runtime

ENV_FOR_FLAG = {flag: env for env, flag in FLAG_FOR.items()}
# Which settings each kind of command takes as flags; each flag and its help come from its
# declaration (jobs/settings/declarations.py).
# Each run by its own clock (SPEC §14): beside STUCK_AFTER wherever it is a flag.
LIMITS = (
    "STUCK_AFTER_BY_KIND",
    "LEARN_THRESHOLDS",
    "LEARN_WINDOW",
    "LEARN_MIN_RUNS",
    "LEARN_MARGIN",
    "LEARN_FLOOR",
    "STALL_AFTER",
)
POLICY = (
    "STUCK_AFTER",
    "RETRY_DELAY",
    "MAX_RETRIES",
    "RETRY_BACKOFF",
    "RETRY_MAX_DELAY",
    "RETRY_JITTER",
    "PERMANENT_PATTERNS",
    "FAILURE_PATTERNS_FILE",
    "BATCH_SIZE",
    "HEARTBEAT_COLUMN",
    "SCRAPE_RUNS_TABLE",
    *LIMITS,
)
TABLE_MAPPING = ("COLUMN_MAP", "STATUS_MAP", "RUN_LABEL")
# WEBHOOK_SECRET has no flag here: argv is what `ps` shows.
EXECUTION = (
    "MAX_CONCURRENT_RETRIES",
    "EXECUTION_TIMEOUT",
    "SCRAPE_RUN_COMMAND",
    "SCRAPE_RUN_CALLABLE",
    "SCRAPE_RUN_WEBHOOK",
    "WEBHOOK_TIMEOUT",
    "SCRAPE_RUN_HANDOFF",
)
# Being told (SPEC §15): ALERT_URLS has no flag (its tokens are secrets); the processes that send
# (daemon, serve) take these, the one-shot commands the choice of events they record.
ALERTS = ("ALERT_EVENTS", "ALERT_EVERY", "ALERT_MIN_RETRIES", "ALERT_FAILURE_RATE", "PUBLIC_URL")


def _remember_flag(ctx: click.Context, param: click.Parameter, value: object) -> None:
    if value is not None:
        ctx.meta.setdefault("stuck_runs.flags", {})[ENV_FOR_FLAG[param.opts[0]]] = value


def config_options(*env_names: str) -> Callable:
    """Flags for the given settings; each overrides its environment variable."""

    # The table comes with its mapping: wherever a command takes the one, it takes the others.
    names = [n for env in env_names for n in ((env, *TABLE_MAPPING) if env == "SCRAPE_RUNS_TABLE" else (env,))]

    secret = [env for env in names if BY_ENV[env].secret]
    if secret:  # a programming error, caught by every test that imports the command
        raise ValueError(f"{', '.join(secret)}: from the environment only, never a flag (`ps` shows argv)")

    def decorate(command: Callable) -> Callable:
        for setting in reversed([BY_ENV[env] for env in names]):
            command = click.option(
                setting.flag, default=None, expose_value=False, callback=_remember_flag, help=setting.option_help
            )(command)
        return command

    return decorate


def load_settings(ctx: click.Context) -> Settings:
    """The settings for this invocation, logging configured from them."""
    from scheduler.logs import configure_logging

    settings = settings_from_environment(ctx.meta.get("stuck_runs.flags", {}))
    configure_logging(settings.log_level, settings.log_format)
    return settings


@contextmanager
def open_runtime(ctx: click.Context, role: str = "cli", *, executes: bool = False) -> Iterator[Runtime]:
    """The runtime for this invocation; with `executes`, refused before connecting when no
    executor could run a retry."""
    from jobs.runtime import Runtime
    from scheduler.wiring import wire

    with _no_collection():
        runtime = wire(Runtime.open(load_settings(ctx), role=role, executes=executes))
    try:
        yield runtime
    finally:
        runtime.close()


all_option = click.option("--all", "show_all", is_flag=True, help="List every run, not only a screenful.")
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts instead of a table.")
dry_run_option = click.option("--dry-run", is_flag=True, help="Print what would change; change nothing.")


# The console process (`main()` with no argv) collects no garbage until its command's modules have
# loaded: what the imports build lives as long as the process, so each collection meanwhile (about
# a hundred for `check`, 30-50 ms of its start) walked the growing heap to free nothing. Then that
# heap is frozen, so later collections skip it too. Not done where `main` runs inside a test's
# process (argv given): freezing its heap would hide the objects from gc's introspection there.
_collecting_after_load = False
_console = False  # `main()` with no argv: the console script's process, which `_end` ends


def _collect_again() -> None:
    global _collecting_after_load
    if _collecting_after_load:
        _collecting_after_load = False
        gc.freeze()
        gc.enable()


@contextmanager
def _no_collection() -> Iterator[None]:
    """The console process collects nothing while its runtime opens either: the driver, the dialect,
    the reflected table and its checks build what lives as long as the process (10 collections
    there, of an idle `check`'s 42), and that is frozen with the rest."""
    if not _console or not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        gc.enable()


def _end(code: int) -> None:
    """Ends the process with `code`. The console process, once its output is flushed and its atexit
    handlers have run (the log's, the pool's, a temporary file's), ends without the interpreter's
    teardown: freeing each of its ~430 modules and their objects one by one took ~15 ms of every
    command, to no one's benefit. Where that could lose anything (another thread still running, an
    output that cannot be flushed: a closed pipe is reported as before), it exits as always."""
    if _console and threading.active_count() == 1:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
            atexit._run_exitfuncs()
            sys.stdout.flush()
            sys.stderr.flush()
        except (OSError, ValueError):
            sys.exit(code)
        os._exit(code & 0xFF)
    sys.exit(code)


class LazyGroup(click.Group):
    """A group whose commands' modules load only when one of them runs.

    `stuck-runs --help` lists COMMANDS' short help without importing SQLAlchemy or Alembic; a
    command imports what it needs and no more (tests/unit/test_cli_startup.py holds this table to
    the commands' own docstrings).
    """

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*self.commands, *COMMANDS})

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in self.commands and name in COMMANDS:
            importlib.import_module(COMMANDS[name][0])  # its commands register on `cli`
        _collect_again()
        return self.commands.get(name)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        with formatter.section("Commands"):
            formatter.write_dl([(name, COMMANDS[name][1]) for name in sorted(COMMANDS)])


# Each command: the module that defines it, and its short help (its docstring's first line).
COMMANDS = {
    "check": ("scheduler.cli.runs", "Fail runs stuck in 'running' and schedule their retries."),
    "process": ("scheduler.cli.runs", "Supersede retries whose chain completed, then execute the due ones."),
    "fix": ("scheduler.cli.runs", "A stuck-run sweep, then a pass over due retries (what the manual script does)."),
    "retry": ("scheduler.cli.retry", "Retry a failed run now, or every failed chain matching filters."),
    "history": ("scheduler.cli.retry", "Every attempt of a run's chain, oldest first."),
    "cancel": (
        "scheduler.cli.control",
        "Cancel a chain's pending or running retry, or every pending retry matching filters.",
    ),
    "pause": (
        "scheduler.cli.control",
        "Stop every process from starting retries; sweeps go on, retries stay scheduled.",
    ),
    "resume": ("scheduler.cli.control", "End a pause: due retries start again at once."),
    "stats": (
        "scheduler.cli.ops",
        "Retry metrics: totals, success rates, retries per chain, by failure pattern and attempt.",
    ),
    "dlq": ("scheduler.cli.ops", "The dead-letter queue: chains that ended permanently failed."),
    "thresholds": (
        "scheduler.cli.thresholds",
        "Each kind's runtimes, the limit in force and the evidence for choosing one.",
    ),
    "doctor": (
        "scheduler.cli.ops",
        "Check configuration, connectivity, migration, indexes, clock skew, executor, privileges.",
    ),
    "migrate": (
        "scheduler.cli.admin",
        "Add the retry columns, status values and indexes to the runs table (idempotent).",
    ),
    "sql": ("scheduler.cli.admin", "Print the monitoring queries (pending, history RUN_ID) in the table's names."),
    "status": ("scheduler.cli.admin", "Each job's last and next run, live daemons, and where the runs stand."),
    "daemon": (
        "scheduler.cli.admin",
        "Run the stuck-run checker (hourly) and the retry processor (every 30 min) until SIGTERM.",
    ),
    "serve": (
        "scheduler.cli.web",
        "Serve the JSON API and the operators' pages on ADMIN_HOST:ADMIN_PORT (127.0.0.1:8080) until SIGTERM.",
    ),
    "alert": ("scheduler.cli.alerts", "Notifications: `alert test` sends a test message to each ALERT_URLS URL."),
    "demo": (
        "scheduler.cli.admin",
        "Run the whole story on an embedded PostgreSQL, a virtual day in about 20 seconds.",
    ),
}


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@config_options("LOG_LEVEL", "LOG_FORMAT")
@click.version_option(package_name="stuck-runs")
def cli() -> None:
    """Find scrape runs stuck in 'running', fail them honestly, and retry them as linked runs.

    Configuration comes from the environment and .env (DATABASE_URL first); flags override it.
    Exit codes: 0 done, 1 refused or partly failed, 2 usage or configuration error.
    """


def _refuse(message: str, code: int, as_json: bool) -> int:
    """One line on stderr; with --json, also the refusal as JSON on stdout for the script."""
    click.echo(f"stuck-runs: {message}", err=True)
    if as_json:
        click.echo(json.dumps({"success": False, "error": message, "exit_code": code}))
    return code


def main(argv: list[str] | None = None) -> None:
    """Console entry: runs a command, turns operator errors into one line and an exit code."""
    global _collecting_after_load, _console
    _console = argv is None
    if argv is None and gc.isenabled():
        gc.disable()
        _collecting_after_load = True
    args = list(sys.argv[1:] if argv is None else argv)
    as_json = "--json" in args[: args.index("--")] if "--" in args else "--json" in args
    try:
        code = cli.main(args=args, prog_name="stuck-runs", standalone_mode=False)
    except click.exceptions.Exit as exc:
        code = exc.exit_code
    except click.ClickException as exc:
        if as_json:
            code = _refuse(exc.format_message(), exc.exit_code, as_json)
        else:
            exc.show()
            code = exc.exit_code
    except click.Abort as exc:
        # click turns a KeyboardInterrupt (ours while printing, or Ctrl-C anywhere else) into Abort.
        if isinstance(exc.__cause__, Interrupted):
            message, code = "interrupted while printing the result; the work itself had finished", exc.__cause__.signum
            code = _refuse(message, 128 + code, False)
        else:
            code = _refuse("interrupted; nothing more was done", EXIT_INTERRUPTED, as_json)
    except OperatorError as exc:
        code = _refuse(str(exc), exc.exit_code, as_json)
    except KeyboardInterrupt:
        code = _refuse("interrupted; nothing more was done", EXIT_INTERRUPTED, as_json)
    _end(code if isinstance(code, int) else EXIT_OK)
