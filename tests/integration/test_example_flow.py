"""SPEC §10, step by step under a frozen clock, with SPEC §9's monitoring queries verbatim."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import sqlalchemy as sa
from freezegun import freeze_time

from jobs.executors.outcome import Completed
from jobs.manual import chain_history
from jobs.recovery import fix_stuck_runs_with_retry
from jobs.running import RunningHere
from jobs.stuck import sweep_stuck_runs
from tests.helpers import ScriptedScraper, insert_run, make_runtime

UTC = timezone.utc
DAY = datetime(2026, 11, 22, tzinfo=UTC)

PENDING_QUERY = """SELECT search_query, location_query, retry_count, max_retries, next_retry_at, status
FROM scrape_runs WHERE status = 'pending_retry' ORDER BY next_retry_at;"""

CHAIN_QUERY = """SELECT search_query, location_query, retry_count, status, error_message, started_at, completed_at
FROM scrape_runs WHERE original_run_id = 'YOUR_RUN_ID' OR id = 'YOUR_RUN_ID' ORDER BY retry_count;"""


def at(hour: int, minute: int = 0) -> datetime:
    return DAY + timedelta(hours=hour, minutes=minute)


def utc(value: datetime | None) -> datetime | None:
    return value if value is None or value.tzinfo else value.replace(tzinfo=UTC)


def monitoring(engine: sa.Engine, root) -> tuple[list[tuple], list[tuple]]:
    with engine.connect() as conn:
        pending = [tuple(r) for r in conn.exec_driver_sql(PENDING_QUERY)]
        chain = [tuple(r) for r in conn.exec_driver_sql(CHAIN_QUERY.replace("YOUR_RUN_ID", str(root)))]
    return pending, chain


def test_the_example_flow(variant_url, variant):
    naive = variant == "enum_naive"
    with freeze_time(at(7, 48)) as frozen:
        scraper = ScriptedScraper()
        rt = make_runtime(variant_url, scraper)
        with rt.engine.begin() as conn:
            started = at(7, 48).replace(tzinfo=None) if naive else at(7, 48)
            root = insert_run(conn, started_at=started, config='{"pages": 3}', user_id=7)

        # 09:00: the hourly check finds it running for 1.2h.
        frozen.move_to(at(9))
        result = fix_stuck_runs_with_retry(1, 4, 4, runtime=rt)
        assert result.sweep.failed == 1 and result.process.executed == ()
        pending, chain = monitoring(rt.engine, root)
        assert [(p[0], p[1], p[2], p[3], utc(p[4]), p[5]) for p in pending] == [
            ("Data Architect", "Belgium", 1, 4, at(13), "pending_retry")
        ]
        assert [(c[2], c[3], c[4], utc(c[6])) for c in chain] == [
            (0, "failed", "Run stuck for 1.2h - retry 1/4 scheduled", at(9)),
            (1, "pending_retry", None, None),
        ]

        # 13:00: the retry processor starts it, and its worker dies (the session ends).
        frozen.move_to(at(13))
        with rt.engine.connect() as conn:
            claim = RunningHere(rt, rt.executor, rt.settings.policy).claim(conn)
            conn.invalidate()  # the worker's process is gone, and its session with it
        assert claim is not None
        claimed = claim.run
        assert claimed.label == "[RETRY 1/4] Data Architect in Belgium"
        assert claimed.inputs["config"] == {"pages": 3} and claimed.inputs["user_id"] == 7

        # 14:00: running for 1.0h, which is not over the threshold.
        frozen.move_to(at(14))
        assert sweep_stuck_runs(rt).failed == 0

        # 15:00: running for 2.0h.
        frozen.move_to(at(15))
        result = fix_stuck_runs_with_retry(1, 4, 4, runtime=rt)
        assert [a.message for a in result.sweep.attempts] == ["Run stuck for 2.0h - retry 2/4 scheduled"]
        pending, _ = monitoring(rt.engine, root)
        assert [(p[2], utc(p[4])) for p in pending] == [(2, at(19))]

        # 19:00: retry 2 runs and completes at 19:15.
        frozen.move_to(at(19))

        def scrape(run):
            frozen.tick(timedelta(minutes=15))
            return Completed()

        scraper.script = scrape
        result = fix_stuck_runs_with_retry(1, 4, 4, runtime=rt)
        assert [(o.label, o.status) for o in result.process.executed] == [
            ("[RETRY 2/4] Data Architect in Belgium", "completed")
        ]

        pending, chain = monitoring(rt.engine, root)
        assert pending == []
        assert [(c[2], c[3], c[4], utc(c[5]), utc(c[6])) for c in chain] == [
            (0, "failed", "Run stuck for 1.2h - retry 1/4 scheduled", at(7, 48), at(9)),
            (1, "failed", "Run stuck for 2.0h - retry 2/4 scheduled", at(13), at(15)),
            (2, "completed", None, at(19), at(19, 15)),
        ]
        history = chain_history(rt, root)
        assert len(history.attempts) == 3 and history.final_status == "success"
        assert {a.original_run_id for a in history.attempts[1:]} == {root}
        assert all(a.inputs["config"] == {"pages": 3} for a in history.attempts)
        rt.close()
