"""A scraper fleet's own worker in a process of its own, for the §12 hand-off tests and chaos.

    python -m tests.fleet_worker --database-url URL --log PATH [--table scrape_runs]
        [--queued pending] [--running running] [--completed completed] [--failed failed]
        [--status-column status] [--started-column started_at] [--completed-column completed_at]
        [--error-column error_message] [--id-column id] [--fate ok|fail|notfound|hang|random]
        [--seed N] [--poll 0.1] [--work 0.2] [--stop-file PATH] [--max-runs N]

It claims one queued run at a time (running, started_at now; FOR UPDATE SKIP LOCKED, so two
workers never share one), works --work seconds and ends it as its fate says, writing only while
the row is still running. Log lines: `claimed <id> <pid>`; `ended <id> <status>` once committed;
`superseded <id>` when the row had left running (nothing written); `abandoned <id>` when the
worker stopped (SIGTERM, or the stop file during a hang) with the run still running, as a
worker that dies leaves it. It stops at the stop file (after the run in hand), after --max-runs
runs, or on SIGTERM; while the database is down it waits and tries again.
"""

from __future__ import annotations

import argparse
import csv
import os
import random
import signal
import subprocess
import sys
import threading
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DB_DOWN_WAIT_SECONDS = 0.5
FATE_WEIGHTS = {"ok": 70, "fail": 20, "notfound": 5, "hang": 5}
ERRORS = {"fail": "HTTP Error 503: Service Unavailable", "notfound": "HTTP Error 404: Not Found"}
EXIT_USAGE = 2  # the table or a column is not there


def quote_table(name: str) -> str:
    """`schema.table`, `"Mixed Case"` or `s."a.b"` as a quoted, possibly qualified, identifier."""
    from sqlalchemy.dialects import postgresql

    preparer = postgresql.dialect().identifier_preparer
    parts = next(csv.reader([name], delimiter=".", quotechar='"'))
    return ".".join(preparer.quote_identifier(part) for part in parts)


def fate_of(run_id: str, fate: str, seed: int) -> str:
    """The fate itself, or for `random` a choice fixed by the seed and the run's id."""
    if fate != "random":
        return fate
    return random.Random(f"{seed}:{run_id}").choices(list(FATE_WEIGHTS), list(FATE_WEIGHTS.values()))[0]


class Statements:
    """The worker's SQL on the table named on the command line, cast to its columns' own types."""

    def __init__(self, conn, args: argparse.Namespace) -> None:
        import sqlalchemy as sa

        table = quote_table(args.table)
        status_type = column_type(conn, table, args.status_column)
        id_type = column_type(conn, table, args.id_column)
        q = conn.dialect.identifier_preparer.quote_identifier
        status, started, completed = q(args.status_column), q(args.started_column), q(args.completed_column)
        error, run_id = q(args.error_column), q(args.id_column)

        def is_(param: str) -> str:
            return f"{status} = CAST(:{param} AS {status_type})"

        self.claim = sa.text(
            f"UPDATE {table} SET {status} = CAST(:running AS {status_type}), {started} = now()"
            f" WHERE {run_id} = (SELECT {run_id} FROM {table} WHERE {is_('queued')}"
            f" ORDER BY {started} NULLS FIRST, {run_id} LIMIT 1 FOR UPDATE SKIP LOCKED)"
            f" AND {is_('queued')} RETURNING {run_id}::text"
        )
        ending = f"UPDATE {table} SET {status} = CAST(:status AS {status_type}), {completed} = now()"
        guard = f" WHERE {run_id} = CAST(:id AS {id_type}) AND {is_('running')} RETURNING {run_id}"
        self.complete = sa.text(ending + guard)
        self.fail = sa.text(ending + f", {error} = :error" + guard)


def column_type(conn, table: str, column: str) -> str:
    import sqlalchemy as sa

    found = conn.execute(
        sa.text(
            "SELECT format_type(atttypid, atttypmod) FROM pg_attribute"
            " WHERE attrelid = to_regclass(:t) AND attname = :c AND attnum > 0 AND NOT attisdropped"
        ),
        {"t": table, "c": column},
    ).scalar()
    if found is None:
        raise LookupError(f"fleet_worker: no column {column!r} in table {table}; pass --table and the --*-column names")
    return found


class Worker:
    def __init__(self, args: argparse.Namespace, log) -> None:
        import sqlalchemy as sa

        self.args, self.log = args, log
        url = args.database_url.replace("postgresql://", "postgresql+psycopg2://", 1)  # as stuck-runs reads it
        self.engine = sa.create_engine(url, pool_pre_ping=True, connect_args={"connect_timeout": 5})
        self.down = (sa.exc.OperationalError, sa.exc.InterfaceError)
        self.stopping = threading.Event()
        self.sql: Statements | None = None
        self.outage = False

    def stop_file_exists(self) -> bool:
        return bool(self.args.stop_file) and Path(self.args.stop_file).exists()

    def run(self) -> None:
        done = 0
        while not (self.stopping.is_set() or self.stop_file_exists()):
            if self.args.max_runs is not None and done >= self.args.max_runs:
                return
            try:
                run_id = self.claim()
            except self.down as exc:
                self.database_down(exc)
                continue
            self.outage = False
            if run_id is None:
                self.stopping.wait(self.args.poll)
                continue
            self.write(f"claimed {run_id} {os.getpid()}")
            done += 1
            self.work(run_id, fate_of(run_id, self.args.fate, self.args.seed))

    def claim(self) -> str | None:
        with self.engine.begin() as conn:
            if self.sql is None:
                self.sql = Statements(conn, self.args)
            return conn.execute(self.sql.claim, {"queued": self.args.queued, "running": self.args.running}).scalar()

    def work(self, run_id: str, fate: str) -> None:
        if fate == "hang":
            while not (self.stopping.is_set() or self.stop_file_exists()):
                self.stopping.wait(self.args.poll)
            self.write(f"abandoned {run_id}")
            return
        if self.stopping.wait(self.args.work):
            self.write(f"abandoned {run_id}")
            return
        params = {"id": run_id, "running": self.args.running}
        if fate == "ok":
            statement, params["status"] = self.sql.complete, self.args.completed
        else:
            statement, params["status"], params["error"] = self.sql.fail, self.args.failed, ERRORS[fate]
        while True:
            try:
                with self.engine.begin() as conn:
                    written = conn.execute(statement, params).first() is not None
                break
            except self.down as exc:  # the scraper keeps its result and writes it once the database is back
                if self.database_down(exc):
                    self.write(f"abandoned {run_id}")
                    return
        self.write(f"ended {run_id} {params['status']}" if written else f"superseded {run_id}")

    def database_down(self, exc: Exception) -> bool:
        """Says so on stderr once an outage, waits; True when the worker is stopping meanwhile."""
        if not self.outage:
            print(
                f"fleet_worker: database unavailable, waiting: {str(exc).splitlines()[0]}", file=sys.stderr, flush=True
            )
            self.outage = True
        return self.stopping.wait(DB_DOWN_WAIT_SECONDS)

    def write(self, line: str) -> None:
        self.log.write(line + "\n")
        self.log.flush()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.fleet_worker", description=__doc__.split("\n")[0])
    parser.add_argument("--database-url", required=True)
    parser.add_argument("--log", required=True)
    parser.add_argument("--table", default="scrape_runs")
    for state in ("queued", "running", "completed", "failed"):
        parser.add_argument(f"--{state}", default="pending" if state == "queued" else state)
    for column, default in (("status", "status"), ("started", "started_at"), ("completed", "completed_at")):
        parser.add_argument(f"--{column}-column", default=default)
    parser.add_argument("--error-column", default="error_message")
    parser.add_argument("--id-column", default="id")
    parser.add_argument("--fate", choices=[*FATE_WEIGHTS, "random"], default="ok")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--poll", type=float, default=0.1, help="seconds between looks at an empty queue")
    parser.add_argument("--work", type=float, default=0.2, help="seconds a run takes")
    parser.add_argument("--stop-file")
    parser.add_argument("--max-runs", type=int)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with open(args.log, "a") as log:
        worker = Worker(args, log)
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: worker.stopping.set())
        try:
            worker.run()
        except LookupError as exc:
            print(exc, file=sys.stderr)
            return EXIT_USAGE
        finally:
            worker.engine.dispose()
    return 0


# --- for tests: real processes ---------------------------------------------------------------


def start_process(module: str, args: list[str], stderr: Path) -> subprocess.Popen:
    """`python -m module args...` from the checkout, its stderr to a file (never a pipe nobody reads)."""
    with open(stderr, "a") as err:
        return subprocess.Popen(
            [sys.executable, "-m", module, *args],
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )


def start_worker(database_url: str, log: Path, **options: object) -> subprocess.Popen:
    """Starts a worker logging to `log` (its stderr beside it, `<log>.stderr`); options are its
    flags with underscores: `start_worker(url, log, fate="fail", max_runs=3, work=0.05)`."""
    args = ["--database-url", database_url, "--log", str(log)]
    for name, value in options.items():
        if value is not None:
            args += [f"--{name.replace('_', '-')}", str(value)]
    return start_process("tests.fleet_worker", args, Path(f"{log}.stderr"))


def read_log(log: Path) -> list[list[str]]:
    """The worker's log lines, split into words (`["ended", id, "completed"]`)."""
    return [line.split() for line in log.read_text().splitlines()] if log.exists() else []


def stop_process(process: subprocess.Popen, timeout: float = 10) -> int:
    """SIGTERM and wait (SIGKILL if it will not go); its exit code."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


if __name__ == "__main__":
    sys.exit(main())
