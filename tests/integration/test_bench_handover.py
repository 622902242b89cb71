"""bench/handover.py's fleet poller: it plays the fleet finishing every handed retry at once, so a
poller that died on one error would leave the cap's slots taken and the bench measuring a stall."""

import threading
import time

import sqlalchemy as sa

from bench.handover import poll

# Fails with a deadlock (what its UPDATE over every running row met against ours' set-wide
# statements) the first time, then answers 1.
ONCE_DEADLOCKED = """
CREATE SEQUENCE bench_poll_calls;
CREATE FUNCTION bench_poll_once_deadlocked() RETURNS int LANGUAGE plpgsql AS $$
BEGIN
    IF nextval('bench_poll_calls') = 1 THEN
        RAISE EXCEPTION 'deadlock detected' USING ERRCODE = '40P01';
    END IF;
    RETURN 1;
END $$;
"""


class Value:
    value = 0


def test_the_fleet_poller_goes_on_after_a_deadlock(engine, db_url):
    with engine.begin() as conn:
        conn.exec_driver_sql(ONCE_DEADLOCKED)
    ready, halt, most = threading.Event(), threading.Event(), Value()
    failed: list[BaseException] = []

    def target() -> None:
        try:
            poll(db_url, "SELECT bench_poll_once_deadlocked()", {}, ready, halt, most)
        except BaseException as exc:  # noqa: BLE001 - what the test reports
            failed.append(exc)

    poller = threading.Thread(target=target, daemon=True)
    poller.start()
    try:
        deadline = time.monotonic() + 30
        while not ready.is_set() and not failed and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not failed, failed
        assert ready.is_set() and most.value == 1
    finally:
        halt.set()
        poller.join(30)
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT last_value FROM bench_poll_calls")).scalar_one() >= 2
