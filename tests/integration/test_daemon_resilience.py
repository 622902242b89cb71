"""The daemon an on-call engineer can forget about: systemd, outages, crashes, replicas."""

from __future__ import annotations

import os
import pwd
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timedelta, timezone

import pytest
import sqlalchemy as sa

from db.engine import make_engine
from scheduler.daemon import Daemon
from scheduler.notify import Notifier
from tests.conftest import REPO
from tests.daemons import DaemonProcess, wait_until
from tests.helpers import ScriptedScraper, insert_due_retry, insert_run, insert_stuck_runs, make_runtime, row
from tests.own_server import migrated_server

pytestmark = pytest.mark.slow


def start_daemon(db_url: str, **env: str) -> DaemonProcess:
    return DaemonProcess(db_url, **env)


def stop(daemon: DaemonProcess, timeout: float = 30) -> str:
    return daemon.stop(timeout)


def scalar(engine: sa.Engine, sql: str, **params):
    with engine.connect() as conn:
        return conn.execute(sa.text(sql), params).scalar_one()


def due_retry(engine: sa.Engine, query: str):
    with engine.begin() as conn:
        return insert_due_retry(conn, search_query=query)[1]


# -- systemd ---------------------------------------------------------------------------------


@pytest.fixture
def notify_socket(tmp_path):
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(0.2)
    yield sock, str(path)
    sock.close()


def receive(sock: socket.socket, until: float) -> list[str]:
    messages = []
    while time.monotonic() < until:
        try:
            messages.append(sock.recv(4096).decode())
        except TimeoutError:
            continue
    return messages


def fields_of(messages: list[str]) -> list[str]:
    return [field for message in messages for field in message.split("\n")]


def test_sd_notify_ready_status_watchdog_and_stopping_on_a_real_socket(db_url, notify_socket):
    sock, path = notify_socket
    daemon = start_daemon(db_url, NOTIFY_SOCKET=path, WATCHDOG_USEC="1000000", CHECK_INTERVAL="1s")
    messages: list[str] = []
    deadline = time.monotonic() + 60  # however slowly a loaded machine starts it
    while time.monotonic() < deadline and not (
        fields_of(messages).count("WATCHDOG=1") >= 4
        and any(f.startswith("STATUS=stuck_run_checker") for f in fields_of(messages))
    ):
        messages += receive(sock, time.monotonic() + 0.5)
    err = stop(daemon)
    messages += receive(sock, time.monotonic() + 0.5)
    assert daemon.returncode == 0, err
    fields = fields_of(messages)
    assert "READY=1" in fields
    assert any(f.startswith("STATUS=stuck_run_checker") and "failed=0" in f for f in fields)
    assert fields.count("WATCHDOG=1") >= 4  # every half WatchdogSec
    assert fields[-2:] == ["STOPPING=1", "STATUS=stopping"]


def test_the_watchdog_is_fed_only_while_the_scheduler_dispatches(db_url, notify_socket):
    sock, path = notify_socket
    rt = make_runtime(db_url, ScriptedScraper())
    daemon = Daemon(rt, Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "400000"}))
    runner = threading.Thread(target=daemon.run)
    runner.start()
    try:
        assert "WATCHDOG=1" in receive(sock, time.monotonic() + 1.5)
        daemon.scheduler.pause()  # a wedged scheduler: nothing is dispatched any more
        receive(sock, time.monotonic() + 0.3)
        assert "WATCHDOG=1" not in receive(sock, time.monotonic() + 1.5)
        daemon.scheduler.resume()
        assert "WATCHDOG=1" in receive(sock, time.monotonic() + 1.5)
    finally:
        daemon.request_stop()
        runner.join(30)
    rt.close()


def open_sockets() -> set[str]:
    """This process's open sockets, as /proc names them (`socket:[inode]`)."""
    found = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            link = os.readlink(f"/proc/self/fd/{fd}")
        except FileNotFoundError:  # the listing's own descriptor, closed by now
            continue
        if link.startswith("socket:"):
            found.add(link)
    return found


def test_the_notifier_opens_one_socket_whatever_the_threads_and_none_once_closed(notify_socket, monkeypatch):
    """The watchdog, the jobs' status and a stop send from threads of their own: two opening the
    socket at once left one unclosed (a ResourceWarning in a full run), and a watchdog ping after
    the daemon's close opened one nobody closed."""
    import scheduler.notify

    sock, path = notify_socket
    opened = []
    real_socket = socket.socket

    def slow_socket(*args):  # widens the window two threads could both open one in
        time.sleep(0.05)
        opened.append(real_socket(*args))
        return opened[-1]

    monkeypatch.setattr(scheduler.notify.socket, "socket", slow_socket)
    notifier = Notifier({"NOTIFY_SOCKET": path})
    start = threading.Barrier(8)
    pings = [threading.Thread(target=lambda: (start.wait(), notifier.watchdog())) for _ in range(8)]
    for thread in pings:
        thread.start()
    for thread in pings:
        thread.join()
    assert len(opened) == 1 and fields_of(receive(sock, time.monotonic() + 0.5)) == ["WATCHDOG=1"] * 8
    notifier.close()
    notifier.watchdog()
    assert len(opened) == 1 and opened[0].fileno() == -1  # closed, and nothing opened after
    assert receive(sock, time.monotonic() + 0.3) == []


def test_without_notify_socket_nothing_is_sent(notify_socket, monkeypatch):
    """Given an environment without NOTIFY_SOCKET, the notifier opens no socket and sends nothing,
    not even to the socket the process's own environment names."""
    sock, path = notify_socket
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    before = open_sockets()
    notifier = Notifier({})
    assert not notifier.enabled and notifier.watchdog_interval is None
    notifier.ready("x")
    notifier.status("y")
    notifier.watchdog()
    notifier.stopping()
    assert open_sockets() == before
    assert receive(sock, time.monotonic() + 0.5) == []
    notifier.close()


def test_the_unit_is_hardened_to_an_exposure_of_at_most_1_5():
    analyze = "/usr/bin/systemd-analyze"
    if not os.path.exists(analyze):
        pytest.skip("systemd-analyze is not installed here")
    result = subprocess.run(
        [analyze, "security", "--offline=true", "--threshold=15", str(REPO / "systemd" / "stuck-runs.service")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout[-2000:]
    exposure = float(result.stdout.strip().splitlines()[-1].split("service:")[1].split()[0])
    assert exposure <= 1.5
    unit = (REPO / "systemd" / "stuck-runs.service").read_text()
    for directive in ("Type=notify", "WatchdogSec=", "Restart=on-failure", "EnvironmentFile=", "User=stuck-runs"):
        assert directive in unit


def test_the_daemon_works_sandboxed_as_the_unit_sandboxes_it(db_url, tmp_path):
    """Read-only file system, private /tmp, no home, unprivileged user, no new privileges."""
    if os.geteuid() != 0:
        pytest.skip("building the sandbox needs root")
    socket_dir = sa.engine.make_url(db_url).query.get("host")
    engine = make_engine(db_url)
    with engine.begin() as conn:
        stuck = insert_run(conn, started_at=datetime.now(timezone.utc) - timedelta(hours=2))
    retry = due_retry(engine, "ok sandboxed")
    # What the sandbox hides but the daemon needs: the database's socket (pgserver keeps it under
    # /tmp), and wherever this checkout, its venv and the interpreter live (a clone in /tmp, pyenv
    # in a home). Production's live in /usr, /opt and /run.
    local = bool(socket_dir) and os.path.isdir(socket_dir)
    needed = [socket_dir] if local else []
    needed += [str(REPO), os.path.realpath(sys.prefix), os.path.realpath(sys.base_prefix)]
    carried = outermost(path for path in needed if path.startswith(("/tmp/", "/root/", "/home/")))
    staged = {path: tempfile.mkdtemp(prefix="sr-sandbox-", dir="/var/tmp") for path in carried}
    # An unprivileged identity that may open the database's socket: its owner when the server is
    # local (pgserver's own user), else nobody.
    owner = os.stat(socket_dir).st_uid if local else 0
    uid = owner if owner != 0 else 65534
    gid = pwd.getpwuid(uid).pw_gid
    sandbox = (
        "set -e; mount --make-rprivate /; "
        + "".join(f"mount --bind {path} {stage}; " for path, stage in staged.items())
        + "mount -t tmpfs tmpfs /tmp; mount -t tmpfs -o mode=755 tmpfs /root; mount -t tmpfs tmpfs /home; "
        + "".join(f"mkdir -p {path}; mount --bind {stage} {path}; " for path, stage in staged.items())
        + "mount -o remount,bind,ro /; "
        + f"exec setpriv --reuid={uid} --regid={gid} --clear-groups --no-new-privs "
        "--inh-caps=-all "
        f"--bounding-set=-all {shlex.quote(sys.executable)} -m scheduler daemon"
    )
    env = {"PYTHONDONTWRITEBYTECODE": "1", "HOME": "/nonexistent", "SCRAPE_RUN_COMMAND": "true", "CHECK_INTERVAL": "1s"}
    daemon = DaemonProcess(db_url, "unshare", "--mount", "sh", "-c", sandbox, **env)
    try:

        def done():
            with engine.connect() as conn:
                return row(conn, stuck)["status"] == "failed" and row(conn, retry)["status"] == "completed"

        wait_until(done, timeout=30)
    finally:
        err = stop(daemon)
        for stage in staged.values():
            os.rmdir(stage)
    assert daemon.returncode == 0, err
    engine.dispose()


def outermost(paths) -> list[str]:
    """The paths not inside another of them: binding the outer one carries the inner."""
    unique = sorted(set(paths))
    return [path for path in unique if not any(path.startswith(other + "/") for other in unique if other != path)]


# -- dispatch and shutdown -------------------------------------------------------------------------


def test_a_due_retry_starts_within_seconds_not_at_the_next_tick(db_url, tmp_path):
    engine = make_engine(db_url)
    daemon = start_daemon(
        db_url, PROCESS_INTERVAL="1h", CHECK_INTERVAL="1h", DISPATCH_POLL="1s", FAKE_SCRAPER_LOG=str(tmp_path)
    )
    try:
        wait_until(lambda: scalar(engine, "SELECT count(*) FROM stuck_runs_job_runs") >= 2)
        retry = due_retry(engine, "ok late arrival")
        wait_until(
            lambda: scalar(engine, "SELECT status FROM scrape_runs WHERE id = :id", id=retry) == "completed", timeout=15
        )
    finally:
        err = stop(daemon)
    assert daemon.returncode == 0, err
    engine.dispose()


def test_a_long_scrape_never_delays_the_stuck_checker(db_url, tmp_path):
    engine = make_engine(db_url)
    retry = due_retry(engine, "hang")
    daemon = start_daemon(db_url, CHECK_INTERVAL="1s", FAKE_SCRAPER_LOG=str(tmp_path))
    try:
        wait_until(lambda: (tmp_path / f"{retry}.json").exists())
        before = scalar(engine, "SELECT count(*) FROM stuck_runs_job_runs WHERE job_id = 'stuck_run_checker'")
        checks = "SELECT count(*) FROM stuck_runs_job_runs WHERE job_id = 'stuck_run_checker'"
        wait_until(lambda: scalar(engine, checks) >= before + 2, timeout=15)  # two checks during the scrape
        assert scalar(engine, "SELECT status FROM scrape_runs WHERE id = :id", id=retry) == "running"
    finally:
        err = stop(daemon)
    assert daemon.returncode == 0, err
    engine.dispose()


# -- outages and crashes ---------------------------------------------------------------------------


def test_a_database_outage_fails_ticks_quietly_and_the_daemon_recovers(tmp_path):
    server = migrated_server(tmp_path)
    daemon = start_daemon(server.url, CHECK_INTERVAL="1s", PROCESS_INTERVAL="1s", DISPATCH_POLL="1s")
    try:
        engine = make_engine(server.url)
        wait_until(lambda: scalar(engine, "SELECT count(*) FROM stuck_runs_job_runs") >= 2)
        engine.dispose()
        server.stop()
        down = time.monotonic()
        wait_until(lambda: daemon.output().count(" failed: database error") >= 3, timeout=30)  # ticks failed
        assert daemon.poll() is None  # still up
        server.start()
        down = time.monotonic() - down
        engine = make_engine(server.url)
        with engine.begin() as conn:
            stuck = insert_run(conn, started_at=datetime.now(timezone.utc) - timedelta(hours=2))
        wait_until(
            lambda: scalar(engine, "SELECT status FROM scrape_runs WHERE id = :id", id=stuck) == "failed", timeout=30
        )
        # The dispatcher polls on its own clock: its recovery is logged on its next poll, not with the sweep.
        wait_until(lambda: "dispatches again" in daemon.output(), timeout=30)
    finally:
        err = stop(daemon)
        server.cleanup()
    assert daemon.returncode == 0, err
    assert "Traceback" not in err
    failures = [line for line in err.splitlines() if " failed: database error" in line]
    assert 3 <= len(failures) <= 3 * (down + 3), down  # a line per failed tick of each job (1 s apart), no storm
    # The line names the server's socket, whose directory's length is the test runner's.
    assert [line for line in failures if len(line.replace(str(tmp_path), "")) >= 400] == []
    assert sum("cannot dispatch" in line for line in err.splitlines()) == 1
    assert "the database answers again" in err and "dispatches again" in err


def test_kill_9_in_the_middle_of_a_sweep_loses_and_duplicates_nothing(db_url):
    engine = make_engine(db_url)
    started = datetime.now(timezone.utc) - timedelta(hours=3)
    with engine.begin() as conn:
        insert_stuck_runs(conn, 20000, started)
    daemon = start_daemon(db_url, BATCH_SIZE="10", SCRAPE_RUN_COMMAND="true", CHECK_INTERVAL="2s")
    failed = wait_until(
        lambda: scalar(engine, "SELECT count(*) FROM scrape_runs WHERE status = 'failed'") >= 500, every=0.02
    )
    daemon.kill()
    at_kill = scalar(engine, "SELECT count(*) FROM scrape_runs WHERE status = 'failed'")
    assert failed and 0 < at_kill < 20000  # really in the middle
    restarted = start_daemon(db_url, BATCH_SIZE="500", SCRAPE_RUN_COMMAND="true", CHECK_INTERVAL="2s")
    try:
        wait_until(lambda: scalar(engine, "SELECT count(*) FROM scrape_runs WHERE status = 'running'") == 0)
    finally:
        err = stop(restarted)
    assert restarted.returncode == 0, err
    with engine.connect() as conn:
        counts = conn.execute(
            sa.text(
                "SELECT count(*) FILTER (WHERE NOT is_retry AND status = 'failed'),"
                " count(*) FILTER (WHERE is_retry), count(DISTINCT original_run_id) FILTER (WHERE is_retry)"
                " FROM scrape_runs"
            )
        ).one()
    assert tuple(counts) == (20000, 20000, 20000)
    engine.dispose()


def test_kill_9_in_the_middle_of_an_execution_leaves_nothing_running_past_the_threshold(db_url, tmp_path):
    engine = make_engine(db_url)
    retry = due_retry(engine, "hangonce")
    settings = {
        "STUCK_AFTER": "3s",
        "CHECK_INTERVAL": "1s",
        "EXECUTION_TIMEOUT": "1h",
        "RETRY_DELAY": "0s",
        "FAKE_SCRAPER_LOG": str(tmp_path),
    }
    daemon = start_daemon(db_url, **settings)
    wait_until(lambda: (tmp_path / f"{retry}.json").exists())
    daemon.kill()
    import json

    os.killpg(json.loads((tmp_path / f"{retry}.json").read_text())["pid"], signal.SIGKILL)
    killed_at = time.monotonic()
    restarted = start_daemon(db_url, **settings)
    try:
        wait_until(
            lambda: scalar(engine, "SELECT status FROM scrape_runs WHERE id = :id", id=retry) == "failed", timeout=30
        )
        noticed = time.monotonic() - killed_at
        wait_until(lambda: scalar(engine, "SELECT count(*) FROM scrape_runs WHERE status = 'completed'") == 1)
    finally:
        err = stop(restarted)
    assert restarted.returncode == 0, err
    assert noticed < 3 + 1 + 10  # the threshold, one check interval, and a restart's start-up
    with engine.connect() as conn:
        chain = conn.execute(
            sa.text("SELECT retry_count, status, error_message FROM scrape_runs WHERE is_retry ORDER BY retry_count")
        ).all()
    assert [(r[0], r[1]) for r in chain] == [(1, "failed"), (2, "completed")]
    assert re.fullmatch(r"Run stuck for [0-9]+s - retry 2/4 scheduled", chain[0][2])  # seconds, never "0.0h"
    engine.dispose()
