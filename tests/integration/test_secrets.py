"""No secret reaches a screen or a log line, however PostgreSQL was given it (`user:secret@`,
`?password=`, an encoded `@`, an unencoded `@`, PGPASSWORD, a service file, .pgpass), whether
the server refuses it, cannot be reached, or goes away under a running daemon."""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url

from db.engine import describe_db_error, make_engine, redacted, scrub
from db.migrate import migrate
from tests.daemons import DaemonProcess, wait_until
from tests.integration.test_cli import cli, one_line_error
from tests.own_server import OwnServer
from tests.schema import TEXT_STATUS

ROLE, DATABASE = "sr_guarded", "sr_guarded_runs"
RIGHT = "Wv8-right-s3cret"  # the role's password
WRONG = "Zq9-wrong-s3cret"  # what the operator typed instead: the server refuses it
UNREACHABLE = {"host": "127.0.0.1", "port": "1"}


@dataclass(frozen=True)
class Guarded:
    server: OwnServer
    socket_dir: str

    def place(self, reachable: bool) -> dict[str, str]:
        return {"host": self.socket_dir} if reachable else UNREACHABLE


@pytest.fixture(scope="module")
def guarded() -> Iterator[Guarded]:
    """A server of its own where `sr_guarded` must give its password (everyone else is trusted).

    Outside pytest's temporary directory, which other sessions close to all but root: the server
    runs as its own user, and must still reach its data when the last test restarts it.
    """
    directory = Path(tempfile.mkdtemp(prefix="stuck-runs-guarded-"))
    server = OwnServer(directory)
    admin = sa.create_engine(server.url, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)
    with admin.connect() as conn:
        conn.exec_driver_sql(f"CREATE ROLE {ROLE} LOGIN PASSWORD '{RIGHT}'")
        conn.exec_driver_sql(f"CREATE DATABASE {DATABASE} OWNER {ROLE}")
        hba = Path(conn.exec_driver_sql("SHOW hba_file").scalar_one())
        hba.write_text(f"local all {ROLE} scram-sha-256\n" + hba.read_text())
        conn.exec_driver_sql("SELECT pg_reload_conf()")
    admin.dispose()
    guarded = Guarded(server, make_url(server.url).query["host"])
    engine = make_engine(driver(query_url(guarded.place(True), RIGHT)))
    with engine.begin() as conn:
        conn.exec_driver_sql(TEXT_STATUS.format(table="scrape_runs"))
    migrate(engine, "scrape_runs")
    engine.dispose()
    yield guarded
    server.cleanup()
    shutil.rmtree(directory, ignore_errors=True)


def driver(url: str) -> str:
    return url.replace("postgresql://", "postgresql+psycopg2://", 1)  # SQLAlchemy 2.1's default is psycopg 3


def query_url(place: dict[str, str], password: str) -> str:
    params = "&".join(f"{k}={v}" for k, v in {**place, "user": ROLE, "password": password}.items())
    return f"postgresql:///{DATABASE}?{params}"


def place_query(place: dict[str, str]) -> str:
    return "&".join(f"{k}={v}" for k, v in place.items())


def connection(form: str, place: dict[str, str], secret: str, tmp_path: Path) -> tuple[str, dict[str, str]]:
    """(DATABASE_URL, extra environment) giving `secret` to PostgreSQL the way `form` says."""
    where = place_query(place)
    if form == "query parameter":
        return query_url(place, secret), {}
    if form == "authority":
        return f"postgresql://{ROLE}:{secret}@/{DATABASE}?{where}", {}
    if form == "encoded @":
        return f"postgresql://{ROLE}:p%40{secret}@/{DATABASE}?{where}", {}
    if form == "unencoded @":
        return f"postgresql://{ROLE}:p@{secret}@/{DATABASE}?{where}", {}
    bare = f"postgresql://{ROLE}@/{DATABASE}?{where}"
    if form == "PGPASSWORD":
        return bare, {"PGPASSWORD": secret}
    if form == ".pgpass":
        passfile = tmp_path / "pgpass"
        passfile.write_text(f"*:*:*:{ROLE}:{secret}\n")
        passfile.chmod(0o600)
        return bare, {"PGPASSFILE": str(passfile)}
    assert form == "service file"
    services = tmp_path / "pg_service.conf"
    lines = [f"{k}={v}" for k, v in {**place, "dbname": DATABASE, "user": ROLE, "password": secret}.items()]
    services.write_text("[scrapes]\n" + "\n".join(lines) + "\n")
    return "postgresql://?service=scrapes", {"PGSERVICEFILE": str(services)}


FORMS = ("query parameter", "authority", "encoded @", "unencoded @", "PGPASSWORD", ".pgpass", "service file")


@pytest.mark.parametrize("command", ["check", "doctor", "status"])
@pytest.mark.parametrize("reachable", [True, False], ids=["password refused", "host unreachable"])
@pytest.mark.parametrize("form", FORMS)
def test_the_secret_is_in_no_output_of_the_cli(guarded, tmp_path, form, reachable, command):
    url, env = connection(form, guarded.place(reachable), WRONG, tmp_path)
    result = cli(command, env={"DATABASE_URL": url, "SCRAPE_RUN_COMMAND": "true", **env})
    assert result.returncode in (1, 2), result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert WRONG not in result.stdout + result.stderr
    if command != "doctor":
        line = one_line_error(result)
        if form == "unencoded @":
            assert result.returncode == 2 and "%40" in line
        else:
            assert "database error while connecting" in line
            assert ("password authentication failed" in line) == reachable
    else:
        assert "connectivity" in result.stdout or "configuration" in result.stdout


@pytest.mark.parametrize("form", ["query parameter", "authority", "PGPASSWORD", "service file"])
def test_the_right_password_works_and_is_shown_nowhere_even_at_debug(guarded, tmp_path, form):
    url, env = connection(form, guarded.place(True), RIGHT, tmp_path)
    result = cli("--log-level", "DEBUG", "check", env={"DATABASE_URL": url, **env})
    assert result.returncode == 0, result.stderr
    assert "failed 0 stuck run(s)" in result.stdout
    doctor = cli("doctor", env={"DATABASE_URL": url, **env})
    assert "✓ connectivity" in doctor.stdout
    assert RIGHT not in result.stdout + result.stderr + doctor.stdout + doctor.stderr


@pytest.mark.slow
@pytest.mark.parametrize("reachable", [True, False], ids=["password refused", "host unreachable"])
def test_a_daemon_waiting_for_its_database_never_logs_the_secret(guarded, tmp_path, reachable):
    daemon = DaemonProcess(query_url(guarded.place(reachable), WRONG))
    try:
        wait_until(lambda: daemon.output().count("trying again in 5s") >= 2, timeout=30)
    finally:
        log = daemon.stop()
    assert WRONG not in log
    assert "password=***" in log and "Traceback" not in log


def job_runs(engine: sa.Engine) -> int:
    with engine.connect() as conn:
        return conn.exec_driver_sql("SELECT count(*) FROM stuck_runs_job_runs").scalar_one()


def wait_for_log(daemon: DaemonProcess, text: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while text not in daemon.output():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


@pytest.mark.slow
def test_a_daemon_whose_database_goes_down_never_logs_the_secret(guarded, tmp_path):
    """Last in this module: it stops and restarts the module's server."""
    url = query_url(guarded.place(True), RIGHT)
    engine = make_engine(driver(url))
    earlier = job_runs(engine)  # `check` records its runs too
    daemon = DaemonProcess(url, CHECK_INTERVAL="1s", PROCESS_INTERVAL="1s", DISPATCH_POLL="1s")
    try:
        wait_until(lambda: job_runs(engine) >= earlier + 2)
        engine.dispose()
        guarded.server.stop()
        assert wait_for_log(daemon, " failed: database error", timeout=30)
        assert wait_for_log(daemon, "cannot write the daemon's records", timeout=30)
        guarded.server.start()
        recovered = wait_for_log(daemon, "the database answers again", timeout=30)
    finally:
        log = daemon.stop()
        engine.dispose()
    assert recovered, log[-3000:]
    assert " failed: database error" in log and "cannot write the daemon's records" in log
    assert RIGHT not in log


# -- the redaction functions themselves: what a driver might echo ---------------------------------


def test_a_url_is_shown_without_any_of_its_secrets():
    url = "postgresql+psycopg2://u:Zq9x@h:5432/db?sslpassword=K3y&password=Wv8y&password=Wv8z&sslmode=require"
    shown = redacted(url)
    assert shown == "postgresql+psycopg2://u:***@h:5432/db?password=***&sslmode=require&sslpassword=***"
    assert redacted(make_url("postgresql://u:p@Zq9x@h/db")) == "postgresql://u:***@***/db"


def test_driver_text_loses_every_secret_the_connection_may_use(tmp_path, monkeypatch):
    services = tmp_path / "pg_service.conf"
    services.write_text("[other]\npassword=not-ours\n[scrapes]\nhost=db\npassword = Svc-s3cret\n")
    passfile = tmp_path / "pgpass"
    passfile.write_text("#comment\ndb:5432:*:scraper:Pass\\:file-s3cret\n*:*:*:someone_else:theirs\n")
    monkeypatch.setenv("PGSERVICEFILE", str(services))
    monkeypatch.setenv("PGPASSFILE", str(passfile))
    monkeypatch.setenv("PGPASSWORD", "Env-s3cret")
    url = "postgresql://scraper:Url%2Fs3cret@db/runs?service=scrapes&sslpassword=Key-s3cret"
    secrets = ("Url/s3cret", "Url%2Fs3cret", "Key-s3cret", "Svc-s3cret", "Pass:file-s3cret", "Env-s3cret")
    text = "could not connect: " + " | ".join(secrets) + " | not-ours | theirs\n[SQL: SELECT 1]"
    line = describe_db_error(sa.exc.OperationalError("SELECT 1", {}, Exception(text)), url)
    assert line == "could not connect: *** | *** | *** | *** | *** | *** | not-ours | theirs"
    assert scrub("user:Env-s3cret", None) == "user:***"


def test_a_short_password_is_hidden_where_it_stands_alone_and_leaves_words_whole():
    url = "postgresql://u:p@h/db"
    assert scrub('connection to server at port 1 failed for password "p"', url) == (
        'connection to server at port 1 failed for password "***"'
    )
