"""Every setting, given every kind of bad value: one line naming it and exit 2 (or accepted, when
the value is legitimately valid), never a traceback, and the database untouched. The whole matrix
runs the CLI's entry in-process (a process per case took minutes); a sample of it, and every
report below, goes through the real console script. Also the operator reports of issue 13 that
used to end in tracebacks."""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlalchemy.engine import Engine, make_url

from db.engine import make_engine
from jobs.settings import ENV_VARS, FLAG_FOR
from jobs.settings.declarations import DECLARED
from tests.cli import run_process
from tests.daemons import FAKE_COMMAND
from tests.helpers import insert_run
from tests.integration.test_cli import cli, one_line_error

SECRET = "Hunter2-s3cret"
HOSTILE: dict[str, str | bytes] = {
    "wrong type": "abc",
    "negative": "-1",
    "out of range": "99999999999",
    "empty": "",
    "whitespace": " \t ",
    "enormous digits": "9" * 10_000,
    "enormous text": "x" * 10_000,
    "quotes": "'\"; DROP TABLE scrape_runs; --",
    "newline": "1h\nSTUCK_AFTER=0",
    "unicode": "ünï©ødé ✓ 😀 \u202e",
    "not UTF-8": b"1h\xff\xfe",  # the environment carries bytes
    "NUL byte": "1h\x00",  # no environment variable or argument can: it comes from .env
}
UNSET = {"empty", "whitespace"}  # an empty value counts as unset: the default holds
ANY_ARGV = {"SCRAPE_RUN_COMMAND"}  # any text that splits into arguments is a command
ACCEPTED = {("ADMIN_HOST", "wrong type")}  # `abc` is a host name (serve says whether it is this host's)
# A valid name that the table lacks is refused by the table check (exit 1), after connecting.
CHECKED_AGAINST_THE_TABLE = {"SCRAPE_RUNS_TABLE", "HEARTBEAT_COLUMN"}


@pytest.fixture
def stuck_db(db_url: str) -> str:
    """The test database, with a run a valid `check` would fail; its password in the URL."""
    engine = make_engine(db_url)
    with engine.begin() as conn:
        insert_run(conn, started_at=datetime.now(timezone.utc) - timedelta(days=2))
    engine.dispose()
    return make_url(db_url).set(password=SECRET).render_as_string(hide_password=False)


@pytest.fixture(scope="module")
def shared_stuck_db(server_url: str, templates: dict[str, str]) -> Iterator[str]:
    """One `stuck_db` for the whole matrix: each case compares the table before and after itself."""
    from tests.conftest import Databases

    databases = Databases(server_url)
    url = databases.create(templates["text_tz"])
    engine = make_engine(url)
    with engine.begin() as conn:
        insert_run(conn, started_at=datetime.now(timezone.utc) - timedelta(days=2))
    engine.dispose()
    yield make_url(url).set(password=SECRET).render_as_string(hide_password=False)
    databases.drop_all()


@pytest.fixture(scope="module")
def shared_observer(shared_stuck_db: str) -> Iterator[Engine]:
    """The matrix's eyes on `shared_stuck_db`: one engine and its one connection for the ~800
    fingerprints (an engine and a session each cost more than most cases)."""
    engine = make_engine(shared_stuck_db, pool_size=1)
    yield engine
    engine.dispose()


def fingerprint(url: str, observer: Engine | None = None) -> tuple:
    """The table's rows, the daemon records and the job runs; read through `observer` when given."""
    engine = observer or make_engine(url)
    with engine.connect() as conn:
        table = conn.exec_driver_sql("SELECT md5(string_agg(t::text, '' ORDER BY id)) FROM scrape_runs t").scalar_one()
        records = conn.exec_driver_sql("SELECT count(*) FROM stuck_runs_daemons").scalar_one()
        runs = conn.exec_driver_sql("SELECT count(*) FROM stuck_runs_job_runs").scalar_one()
    if observer is None:
        engine.dispose()
    return table, records, runs


def run_with(name: str, value: str | bytes, url: str, tmp_path: Path, *, process: bool = False):
    """`stuck-runs check` with `name` set to `value` (in .env when the environment cannot carry it);
    with `process`, in a real process of the console script."""
    env: dict[str, str | bytes] = {} if name == "DATABASE_URL" else {"DATABASE_URL": url}
    if isinstance(value, str) and "\x00" in value:
        (tmp_path / ".env").write_bytes(f"{name}={value}\n".encode())
    else:
        env[name] = value
    if process:
        return run_process(["check"], env={**os.environ, **env}, cwd=tmp_path)
    return cli("check", env=env, cwd=tmp_path)


def run_in_process(name: str, value: str | bytes, url: str, tmp_path: Path, monkeypatch, capfd):
    """`run_with`, through `scheduler.cli.main` in this process: the same entry, no interpreter start."""
    from scheduler.cli import main

    monkeypatch.chdir(tmp_path)
    if name != "DATABASE_URL":
        monkeypatch.setenv("DATABASE_URL", url)
    if isinstance(value, str) and "\x00" in value:
        (tmp_path / ".env").write_bytes(f"{name}={value}\n".encode())
    elif isinstance(value, bytes):
        monkeypatch.setitem(os.environb, name.encode(), value)
    else:
        monkeypatch.setenv(name, value)
    capfd.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(["check"])  # anything but SystemExit escaping here is the traceback an operator would see
    out, err = capfd.readouterr()
    return subprocess.CompletedProcess(["stuck-runs", "check"], exit_.value.code, out, err)


def assert_one_line_or_accepted(
    result, name: str, kind: str, url: str, before: tuple, observer: Engine | None = None
) -> None:
    output = result.stdout + result.stderr
    assert "Traceback" not in output, output[-3000:]
    assert SECRET not in output
    if result.returncode == 0:
        assert kind in UNSET or name in ANY_ARGV or (name, kind) in ACCEPTED, output
        return
    line = one_line_error(result)
    assert line.startswith("stuck-runs: ")
    if result.returncode == 1:
        assert name in CHECKED_AGAINST_THE_TABLE and kind == "wrong type", line
    else:
        assert result.returncode == 2, output
        assert name in line or FLAG_FOR[name] in line, line
        assert len(line) < 400
        assert fingerprint(url, observer) == before  # refused before the database was touched


def one_setting_per_parser() -> list[str]:
    """The first setting of each parser (`partial`s by their function): what tells settings apart
    when the interpreter hands them bytes it could not decode, or a value reaches the parser."""
    first: dict[object, str] = {}
    for setting in DECLARED:
        first.setdefault(getattr(setting.parse, "func", setting.parse), setting.env)
    return sorted(first.values())


PARSER_FAMILIES = one_setting_per_parser()
# Through the CLI's entry, on the database: each parser family with every hostile value, every
# other setting with one. The loader's matrix below holds every setting to every value.
THROUGH_THE_ENTRY = [(name, kind) for name in PARSER_FAMILIES for kind in HOSTILE] + [
    (name, "wrong type") for name in ENV_VARS if name not in PARSER_FAMILIES
]


@pytest.mark.parametrize(("name", "kind"), THROUGH_THE_ENTRY)
def test_every_setting_with_a_bad_value_is_one_line_or_accepted(
    shared_stuck_db, shared_observer, tmp_path, monkeypatch, capfd, name, kind
):
    before = fingerprint(shared_stuck_db, shared_observer)
    result = run_in_process(name, HOSTILE[kind], shared_stuck_db, tmp_path, monkeypatch, capfd)
    assert_one_line_or_accepted(result, name, kind, shared_stuck_db, before, shared_observer)


def settings_with(name: str, value: str | bytes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> object:
    """What every command loads first (`settings_from_environment`), with `name` set to `value` as
    `run_in_process` sets it: the settings, or the ConfigError the entry prints as its one line."""
    from db.errors import ConfigError
    from jobs.settings import settings_from_environment

    with monkeypatch.context() as patch:
        patch.chdir(tmp_path)
        if name != "DATABASE_URL":
            patch.setenv("DATABASE_URL", f"postgresql://u:{SECRET}@127.0.0.1:1/db")
        if isinstance(value, str) and "\x00" in value:
            (tmp_path / ".env").write_bytes(f"{name}={value}\n".encode())
        elif isinstance(value, bytes):
            patch.setitem(os.environb, name.encode(), value)
        else:
            patch.setenv(name, value)
        try:
            return settings_from_environment()
        except ConfigError as exc:
            return exc
        finally:
            (tmp_path / ".env").unlink(missing_ok=True)


@pytest.mark.parametrize("name", ENV_VARS)
def test_every_setting_with_every_bad_value_is_one_line_or_accepted_by_the_loader(tmp_path, monkeypatch, name):
    """The whole matrix, every setting by every hostile value, at the loader every command calls
    before it touches the database (no database here): a refusal is a ConfigError, exit 2 at the
    entry, whose line names the setting and never its secret; what it accepts is what the entry
    accepts, or a case the entry's test runs on the table."""
    from db.errors import ConfigError

    for kind, value in HOSTILE.items():
        got = settings_with(name, value, tmp_path, monkeypatch)
        if not isinstance(got, ConfigError):
            accepted = kind in UNSET or name in ANY_ARGV or (name, kind) in ACCEPTED
            # What only the table can refuse (a column TARGET names, say) goes through the entry above.
            assert accepted or (name, kind) in THROUGH_THE_ENTRY, (name, kind)
            continue
        line = f"stuck-runs: {got}"
        assert "\n" not in line and len(line) < 400, (name, kind, line)
        assert name in line or FLAG_FOR[name] in line, (name, kind, line)
        assert SECRET not in line, (name, kind, line)


# The matrix above runs in-process (tests/cli.py, held to the process by test_cli_runner.py), the
# undecodable bytes too, for every setting; the interpreter's own decoding at its start is the one
# place a process could differ: a setting of each parser goes through it.
@pytest.mark.parametrize("kind", ["not UTF-8"])
@pytest.mark.parametrize("name", PARSER_FAMILIES)
def test_bad_values_through_the_real_console_script(stuck_db, tmp_path, name, kind):
    before = fingerprint(stuck_db)
    result = run_with(name, HOSTILE[kind], stuck_db, tmp_path, process=True)
    assert_one_line_or_accepted(result, name, kind, stuck_db, before)


def test_the_nul_byte_case_really_reaches_the_settings(stuck_db, tmp_path):
    result = run_with("STUCK_AFTER", "1h\x00", stuck_db, tmp_path)
    assert result.returncode == 2
    assert "'STUCK_AFTER' in " in one_line_error(result) and "NUL byte" in result.stderr
    (tmp_path / ".env").write_bytes(b"STUCK_AFTER=1h\xff\n")
    assert "is not UTF-8 text" in one_line_error(cli("check", env={"DATABASE_URL": stuck_db}, cwd=tmp_path))


# -- what the tester reported -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "env", "fragment"),
    [
        (["check"], {"STUCK_AFTER": "99999999999d"}, "STUCK_AFTER='99999999999d' is too long: use at most 3650d"),
        (["check"], {"RETRY_DELAY": "999999999d"}, "RETRY_DELAY='999999999d' is too long: use at most 3650d"),
        (["check", "--retry-max-delay", "1e400"], {}, "--retry-max-delay='1e400' is not a duration"),
        (["check", "--stuck-after", "nan"], {}, "--stuck-after='nan' is not a duration"),
        (["check", "--stuck-after", "inf"], {}, "--stuck-after='inf' is not a duration"),
        (["check", "--stuck-after", "-1h"], {}, "--stuck-after='-1h' is not a duration"),
        (["check", "--stuck-after", ""], {}, "--stuck-after='' is not a duration"),
        (["stats", "--since", "99999999d"], {}, "--since='99999999d' is too long: use at most 3650d"),
        (["retry", "--since", "99999999d"], {}, "--since='99999999d' is too long"),
        (["retry", "--error-like", "%", "--spread", "99999999d"], {}, "--spread='99999999d' is too long"),
        (["dlq", "list", "--since", "99999999d"], {}, "--since='99999999d' is too long"),
        (["dlq", "purge", "--older-than", "99999999d"], {}, "--older-than='99999999d' is too long"),
    ],
)
def test_durations_that_would_overflow_are_one_line_and_change_nothing(stuck_db, args, env, fragment):
    before = fingerprint(stuck_db)
    result = cli(*args, env={"DATABASE_URL": stuck_db, **env})
    assert result.returncode == 2, result.stderr
    line = one_line_error(result)
    assert fragment in line and "[parameters" not in result.stderr and SECRET not in result.stderr
    assert fingerprint(stuck_db) == before


def test_a_port_that_is_not_a_number_is_one_line_naming_it():
    result = cli("check", env={"DATABASE_URL": f"postgresql://u:{SECRET}@localhost:abc/db"})
    assert result.returncode == 2
    line = one_line_error(result)
    assert "DATABASE_URL: port 'abc' is not accepted: use a number from 1 to 65535" in line
    assert SECRET not in line


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (b'{"patterns": {"caf\xe9": "caf\xe9"}}', "is not UTF-8 text (byte 0xe9 at offset 18): save it as UTF-8"),
        (None, "cannot be read: Is a directory"),
        (b'[{"patterns": {}}]', 'expected {"patterns": {name: regex}, "permanent": [names]}'),
        (b'{"permanent": ["not_found", "captca"]}', "\"permanent\" names an unknown failure pattern 'captca'"),
    ],
)
def test_a_bad_failure_patterns_file_is_blamed_in_one_line(stuck_db, tmp_path, content, fragment):
    path = tmp_path / "patterns.json"
    path.mkdir() if content is None else path.write_bytes(content)
    before = fingerprint(stuck_db)
    result = cli("check", env={"DATABASE_URL": stuck_db, "FAILURE_PATTERNS_FILE": str(path)})
    assert result.returncode == 2
    line = one_line_error(result)
    assert line.startswith(f"stuck-runs: FAILURE_PATTERNS_FILE={str(path)!r}") and fragment in line
    assert "PERMANENT_PATTERNS" not in line
    assert fingerprint(stuck_db) == before


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A port another process listens on."""
    taken = socket.socket()
    taken.bind(("0.0.0.0", 0))
    taken.listen()
    yield taken.getsockname()[1]
    taken.close()


def test_a_metrics_port_in_use_stops_the_daemon_before_it_touches_the_database(stuck_db, taken_port):
    before = fingerprint(stuck_db)
    env = {"DATABASE_URL": stuck_db, "METRICS_PORT": str(taken_port), "SCRAPE_RUN_COMMAND": FAKE_COMMAND}
    result = cli("daemon", env=env, timeout=30)
    assert result.returncode == 2, result.stderr
    assert f"METRICS_PORT={taken_port} is already in use" in one_line_error(result)
    assert fingerprint(stuck_db) == before  # no daemon record, no job run, the stuck run untouched


def test_a_metrics_port_in_use_stops_the_daemon_even_while_the_database_is_down(taken_port):
    env = {
        "DATABASE_URL": "postgresql://u@127.0.0.1:1/db",
        "METRICS_PORT": str(taken_port),
        "SCRAPE_RUN_COMMAND": "true",
    }
    result = cli("daemon", env=env, timeout=30)
    assert result.returncode == 2 and "METRICS_PORT" in one_line_error(result)  # not "trying again in 5s"
