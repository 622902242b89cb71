"""`stuck-runs`: the command line. Operator errors become one line and an exit code here, and
only here; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import click

from jobs.config import FLAG_FOR, Settings, settings_from_environment
from jobs.errors import EXIT_OK, EXIT_USAGE, OperatorError
from jobs.runtime import Runtime
from scheduler.logs import configure_logging

ENV_FOR_FLAG = {flag: env for env, flag in FLAG_FOR.items()}
HELP = {
    "STUCK_AFTER": "A run is stuck after this long without progress (90s, 30m, 1h, 1d). [STUCK_AFTER, 1h]",
    "RETRY_DELAY": "Wait this long before a retry. [RETRY_DELAY, 4h]",
    "MAX_RETRIES": "Retry budget of a chain, fixed at its first failure. [MAX_RETRIES, 4]",
    "RETRY_BACKOFF": "fixed or exponential. [RETRY_BACKOFF, fixed]",
    "RETRY_MAX_DELAY": "Cap of exponential backoff. [RETRY_MAX_DELAY, 1d]",
    "RETRY_JITTER": "Random extra delay, as a fraction of the delay. [RETRY_JITTER, 0]",
    "PERMANENT_PATTERNS": "Failure patterns never retried. [PERMANENT_PATTERNS, not_found,forbidden]",
    "FAILURE_PATTERNS_FILE": "JSON file of extra failure patterns (and the permanent ones). [FAILURE_PATTERNS_FILE]",
    "BATCH_SIZE": "Rows per transaction. [BATCH_SIZE, 1000]",
    "HEARTBEAT_COLUMN": "Column that shows progress (e.g. updated_at). [HEARTBEAT_COLUMN]",
    "SCRAPE_RUNS_TABLE": "The runs table, optionally schema-qualified. [SCRAPE_RUNS_TABLE, scrape_runs]",
    "MAX_CONCURRENT_RETRIES": "Retries executing at once across all processes. [MAX_CONCURRENT_RETRIES, 1]",
    "EXECUTION_TIMEOUT": "Kill an execution after this long. [EXECUTION_TIMEOUT, = STUCK_AFTER]",
    "SCRAPE_RUN_COMMAND": "Argv template, e.g. 'python -m scraper --run-id {run_id}'. [SCRAPE_RUN_COMMAND]",
    "SCRAPE_RUN_CALLABLE": "package.module:function called with the run. [SCRAPE_RUN_CALLABLE]",
    "CHECK_INTERVAL": "How often the stuck checker runs. [CHECK_INTERVAL, 1h]",
    "PROCESS_INTERVAL": "How often the retry processor runs at least. [PROCESS_INTERVAL, 30m]",
    "DISPATCH_POLL": "How often the daemon looks for a due retry and a free slot. [DISPATCH_POLL, 5s]",
    "METRICS_PORT": "Serve Prometheus metrics on this port. [METRICS_PORT]",
    "LOG_LEVEL": "TRACE, DEBUG, INFO, WARNING, ERROR. [LOG_LEVEL, INFO]",
    "LOG_FORMAT": "text or json. [LOG_FORMAT, text]",
}
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
)
EXECUTION = ("MAX_CONCURRENT_RETRIES", "EXECUTION_TIMEOUT", "SCRAPE_RUN_COMMAND", "SCRAPE_RUN_CALLABLE")


def _remember_flag(ctx: click.Context, param: click.Parameter, value: object) -> None:
    if value is not None:
        ctx.meta.setdefault("stuck_runs.flags", {})[ENV_FOR_FLAG[param.opts[0]]] = value


def config_options(*env_names: str) -> Callable:
    """Flags for the given settings; each overrides its environment variable."""

    def decorate(command: Callable) -> Callable:
        for env in reversed(env_names):
            command = click.option(
                FLAG_FOR[env], default=None, expose_value=False, callback=_remember_flag, help=HELP[env]
            )(command)
        return command

    return decorate


def load_settings(ctx: click.Context) -> Settings:
    """The settings for this invocation, logging configured from them."""
    settings = settings_from_environment(ctx.meta.get("stuck_runs.flags", {}))
    configure_logging(settings.log_level, settings.log_format)
    return settings


@contextmanager
def open_runtime(ctx: click.Context, role: str = "cli") -> Iterator[Runtime]:
    runtime = Runtime.open(load_settings(ctx), role=role)
    try:
        yield runtime
    finally:
        runtime.close()


json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts instead of a table.")
dry_run_option = click.option("--dry-run", is_flag=True, help="Print what would change; change nothing.")


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@config_options("LOG_LEVEL", "LOG_FORMAT")
@click.version_option(package_name="stuck-runs")
def cli() -> None:
    """Find scrape runs stuck in 'running', fail them honestly, and retry them as linked runs.

    Configuration comes from the environment and .env (DATABASE_URL first); flags override it.
    Exit codes: 0 done, 1 refused or partly failed, 2 usage or configuration error.
    """


def main(argv: list[str] | None = None) -> None:
    """Console entry: runs a command, turns operator errors into one line and an exit code."""
    try:
        code = cli.main(args=argv, prog_name="stuck-runs", standalone_mode=False)
    except click.exceptions.Exit as exc:
        code = exc.exit_code
    except click.ClickException as exc:
        exc.show()
        code = exc.exit_code
    except click.Abort:
        click.echo("Aborted.", err=True)
        code = EXIT_USAGE
    except OperatorError as exc:
        click.echo(f"stuck-runs: {exc}", err=True)
        code = exc.exit_code
    except KeyboardInterrupt:
        code = 130
    sys.exit(code if isinstance(code, int) else EXIT_OK)


from scheduler.cli import admin, ops, runs  # noqa: E402,F401  (commands register on `cli`)
