"""The invariant auditor: what must hold after any trial, whatever was killed or restarted."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import sqlalchemy as sa

PERMANENT = ("not_found", "forbidden")

# An attempt the checker failed that the scraper then completed late ("completed late"): its
# pending retry was superseded and its next_retry_at cleared, so whether a retry was scheduled
# from it is known only from the retry row itself (at most one).
COMPLETED_LATE = "{p}.status = 'completed' AND {p}.failure_pattern IS NOT NULL"

# Attempts stuck-runs failed (failure_pattern set) whose retry is scheduled but missing, or more
# than one; a completed-late attempt has at most one.
RETRIES_PER_SCHEDULED = f"""
SELECT f.id, count(r.id) AS retries
FROM scrape_runs f
LEFT JOIN scrape_runs r ON r.is_retry AND r.original_run_id = coalesce(f.original_run_id, f.id)
                       AND r.retry_count = f.retry_count + 1
WHERE f.failure_pattern IS NOT NULL AND (f.next_retry_at IS NOT NULL OR {COMPLETED_LATE.format(p="f")})
GROUP BY f.id, f.next_retry_at HAVING count(r.id) <> 1 AND (f.next_retry_at IS NOT NULL OR count(r.id) > 1)
"""

# Chains stuck-runs ended: budget spent or a permanent pattern, and a dead letter for each.
ENDED_WITHOUT_REASON = """
SELECT f.id, f.retry_count, f.max_retries, f.failure_pattern FROM scrape_runs f
WHERE f.status = 'failed' AND f.failure_pattern IS NOT NULL AND f.next_retry_at IS NULL
  AND NOT (f.retry_count >= f.max_retries OR f.failure_pattern = ANY (:permanent))
"""
ENDED_WITHOUT_DEAD_LETTER = """
SELECT f.id FROM scrape_runs f
WHERE f.status = 'failed' AND f.failure_pattern IS NOT NULL AND f.next_retry_at IS NULL
  AND NOT EXISTS (SELECT 1 FROM scrape_run_dead_letters d WHERE d.run_id = f.id)
"""

# A retry row must follow an attempt whose retry was scheduled.
ORPHAN_RETRIES = f"""
SELECT r.id FROM scrape_runs r
WHERE r.is_retry AND NOT EXISTS (
    SELECT 1 FROM scrape_runs p
    WHERE coalesce(p.original_run_id, p.id) = r.original_run_id AND p.retry_count = r.retry_count - 1
      AND (p.next_retry_at IS NOT NULL OR {COMPLETED_LATE.format(p="p")}))
"""

DUPLICATE_RETRY_NUMBERS = """
SELECT original_run_id, retry_count FROM scrape_runs WHERE is_retry
GROUP BY original_run_id, retry_count HAVING count(*) > 1
"""

CANCELLED_WITHOUT_COMPLETION = """
SELECT c.id FROM scrape_runs c WHERE c.status = 'cancelled' AND NOT EXISTS (
    SELECT 1 FROM scrape_runs d WHERE d.status = 'completed'
      AND (d.id = c.original_run_id OR (d.is_retry AND d.original_run_id = c.original_run_id)))
"""

# `pending` is the hand-off trials' queued value: a retry waiting for the fleet's workers.
OPEN = (
    "SELECT status, count(*) FROM scrape_runs WHERE status IN ('running', 'pending_retry', 'pending') GROUP BY status"
)
TERMINAL = ("completed", "failed", "cancelled")

TOTALS = """
SELECT count(*) AS runs,
       count(*) FILTER (WHERE is_retry) AS retries,
       count(*) FILTER (WHERE failure_pattern = 'stuck') AS stuck_failed,
       count(*) FILTER (WHERE status = 'completed') AS completed,
       count(*) FILTER (WHERE status = 'cancelled') AS superseded,
       (SELECT count(*) FROM scrape_run_dead_letters) AS dead_letters,
       count(*) FILTER (WHERE handed_off IS NOT NULL) AS handed_off,
       count(*) FILTER (
           WHERE failure_pattern IS NOT NULL AND (next_retry_at IS NOT NULL OR (
               status = 'completed' AND EXISTS (
                   SELECT 1 FROM scrape_runs n WHERE n.is_retry AND n.retry_count = t.retry_count + 1
                     AND n.original_run_id = coalesce(t.original_run_id, t.id))))) AS retries_scheduled
FROM scrape_runs t
"""


@dataclass
class Audit:
    violations: list[str] = field(default_factory=list)
    totals: dict = field(default_factory=dict)
    totals_extra: dict = field(default_factory=dict)  # what the trial's fleet did

    def check(self, condition: bool, text: str) -> None:
        if not condition:
            self.violations.append(text)


@dataclass(frozen=True)
class ScrapydSeen:
    """What a Scrapyd trial saw: the spiders' log and every job `listjobs.json` listed
    (chaos/scrapyd.py `Sighting`s), with the Scrapyd lifetime each came from."""

    spider_log: Path
    sightings: tuple = ()


@dataclass(frozen=True)
class Disruptions:
    """What the monkey did that may cut a delivery short: the pids it killed, when the database
    restarted (wall-clock seconds)."""

    killed: frozenset[int] = frozenset()
    restarts: tuple[tuple[float, float], ...] = ()  # (stopped, started again)


def audit(
    url: str,
    fleet_log: Path,
    exec_log: Path,
    receiver_log: Path | None = None,
    worker_logs=(),
    disruptions: Disruptions = Disruptions(),
    scrapyd: ScrapydSeen | None = None,
) -> Audit:
    result = Audit()
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            status = dict(conn.execute(sa.text("SELECT id::text, status FROM scrape_runs")).all())
            completed_by_fleet = [line.split()[1] for line in _lines(fleet_log) if line.startswith("completed ")]
            turned = [i for i in completed_by_fleet if status.get(i) != "completed"]
            result.check(not turned, f"completions turned into something else: {turned[:5]}")
            execs = [line.split() for line in _lines(exec_log)]
            starts = Counter(parts[1] for parts in execs if parts[0] == "start")
            twice = [i for i, n in starts.items() if n > 1]
            result.check(not twice, f"retries executed more than once: {twice[:5]}")
            own = [p[1] for p in execs if p[0] == "end" and p[3] == "own_completed" and status.get(p[1]) != "completed"]
            result.check(not own, f"completions the scraper wrote in an execution were overwritten: {own[:5]}")
            executed_not_retries = [i for i in starts if i not in status]
            result.check(not executed_not_retries, f"executions of unknown runs: {executed_not_retries[:5]}")

            if receiver_log is not None:
                _check_deliveries(result, status, receiver_log, disruptions)
                # A mark left on a row the fleet ended (its process killed before the confirm) is
                # inert: only a running row's mark counts, and none may be left being delivered.
                marked = "SELECT count(*) FROM scrape_runs WHERE delivering_by IS NOT NULL AND status = 'running'"
                still = conn.execute(sa.text(marked)).scalar_one()
                result.check(not still, f"retries still being delivered after the trial settled: {still}")
            if worker_logs:
                _check_workers(result, status, worker_logs)
            if scrapyd is not None:
                _check_scrapyd(result, status, scrapyd, daemons_killed=bool(disruptions.killed))
            for name, sql, params in (
                ("failed attempts whose scheduled retry is missing or doubled", RETRIES_PER_SCHEDULED, {}),
                (
                    "chains ended with budget and no permanent error",
                    ENDED_WITHOUT_REASON,
                    {"permanent": list(PERMANENT)},
                ),
                ("chains ended without a dead letter", ENDED_WITHOUT_DEAD_LETTER, {}),
                ("retries nobody scheduled", ORPHAN_RETRIES, {}),
                ("two retries with one number in a chain", DUPLICATE_RETRY_NUMBERS, {}),
                ("cancelled retries of chains that never completed", CANCELLED_WITHOUT_COMPLETION, {}),
            ):
                rows = conn.execute(sa.text(sql), params).all()
                result.check(not rows, f"{name}: {len(rows)} (e.g. {[tuple(r) for r in rows[:3]]})")
            left = dict(conn.execute(sa.text(OPEN)).all())
            result.check(not left, f"left open after the trial settled: {left}")
            result.totals = dict(conn.execute(sa.text(TOTALS)).mappings().one())
            result.totals["executions"] = sum(starts.values())
            result.totals["fleet_completions"] = len(completed_by_fleet)
            result.totals.update(result.totals_extra)
            # The counts add up: each scheduled retry is a retry row, each ended chain one letter.
            result.check(
                result.totals["retries"] == result.totals["retries_scheduled"],
                f"{result.totals['retries']} retry rows for {result.totals['retries_scheduled']} scheduled retries",
            )
    finally:
        engine.dispose()
    return result


ACCEPTED = ("ok", "duplicate")
WEBHOOK_TIMEOUT_S = 1.0  # the trials' WEBHOOK_TIMEOUT: how long a daemon waits for an answer


def _check_deliveries(
    result: Audit, status: dict[str, str], receiver_log: Path, disruptions: Disruptions = Disruptions()
) -> None:
    """The webhook fleet (SPEC §12's hand-over): no retry was delivered twice at once (two
    daemons, or two receivers behind one URL, would then both run it) unless the first delivery's
    process was killed or the database restarted under it; none the fleet took (a 2xx) was
    delivered again unless that delivery's process died or the database restarted before its
    confirm (only a lease that ran out redelivers); none acknowledged was lost; and no outcome
    the fleet wrote was overwritten."""
    lines = [json.loads(line) for line in _lines(receiver_log) if line.strip()]
    requests = [line for line in lines if "event" not in line and line.get("key")]
    answered = {line["n"]: line["at"] for line in lines if line.get("event") == "answered"}

    def taken(request: dict) -> bool:
        """The daemon heard the 2xx: it went out in full within its timeout of the request's arrival
        (the receiver logs an answer before sending it, and the monkey may kill it in between). A
        log that does not record answers (no `n`) counts every accepted request as heard."""
        if "n" not in request:
            return True
        return request["n"] in answered and answered[request["n"]] - request["at"] < WEBHOOK_TIMEOUT_S

    by_key: dict[str, list[dict]] = {}
    for request in sorted(requests, key=lambda r: r["at"]):
        by_key.setdefault(request["key"], []).append(request)
    overlapping, again = [], []
    for key, deliveries in by_key.items():
        for earlier, later in zip(deliveries, deliveries[1:], strict=False):
            answer = earlier["answer"]
            waited = min(float(answer.split(":")[1]), WEBHOOK_TIMEOUT_S) if answer.startswith("hang:") else 0.0
            cut_short = _pid(earlier) in disruptions.killed or any(
                stopped <= later["at"] and earlier["at"] <= started for stopped, started in disruptions.restarts
            )
            if later["at"] < earlier["at"] + waited - 0.05 and not cut_short:
                overlapping.append(key)
            if answer.split(":")[0] in ACCEPTED and not cut_short and taken(earlier):
                again.append(key)
    result.check(not overlapping, f"retries delivered twice at once: {overlapping[:5]}{_timeline(by_key, overlapping)}")
    result.check(
        not again,
        f"retries the fleet took delivered again, their process alive: {sorted(again)[:5]}"
        f"{_timeline(by_key, sorted(again))}",
    )
    acknowledged = {r["key"] for r in requests if r["answer"].split(":")[0] in ACCEPTED}
    lost = sorted(k for k in acknowledged if status.get(k) not in TERMINAL)
    result.check(not lost, f"acknowledged deliveries lost (not ended): {[(k, status.get(k)) for k in lost[:5]]}")
    written = [line["id"] for line in lines if line.get("event") == "completed"]
    turned = [i for i in written if status.get(i) != "completed"]
    result.check(not turned, f"completions the receiver's fleet wrote were overwritten: {turned[:5]}")
    result.totals_extra = {"deliveries": len(requests), "acknowledged": len(acknowledged)}


def _timeline(by_key: dict[str, list[dict]], keys: list[str]) -> str:
    """The first flagged retry's deliveries (arrival, answer, delivering pid): what a report needs
    to tell a fault from a trial's bad luck without the trial's files."""
    if not keys:
        return ""
    seen = [(round(r["at"], 3), r["answer"], _pid(r)) for r in by_key[keys[0]]]
    return f"; {keys[0]}'s deliveries (at, answer, pid): {seen}"


def _pid(request: dict) -> int | None:
    """The delivering process, from its User-Agent: `stuck-runs (host; pid 123)`."""
    agent = request.get("headers", {}).get("user-agent", "")
    _, found, rest = agent.partition("; pid ")
    digits = rest.rstrip(")")
    return int(digits) if found and digits.isdigit() else None


def _check_workers(result: Audit, status: dict[str, str], worker_logs) -> None:
    """The queue fleet: no retry was taken by two workers, none a worker took was lost, and no
    completion a worker wrote was overwritten."""
    lines = [line.split() for log in worker_logs for line in _lines(log)]
    claimed = Counter(parts[1] for parts in lines if parts and parts[0] == "claimed")
    twice = [i for i, n in claimed.items() if n > 1]
    result.check(not twice, f"retries taken by two workers: {twice[:5]}")
    lost = sorted(i for i in claimed if status.get(i) not in TERMINAL)
    result.check(not lost, f"retries workers took were lost (not ended): {[(i, status.get(i)) for i in lost[:5]]}")
    completed = [parts[1] for parts in lines if parts and parts[0] == "ended" and parts[2] == "completed"]
    turned = [i for i in completed if status.get(i) != "completed"]
    result.check(not turned, f"completions a worker wrote were overwritten: {turned[:5]}")
    result.totals_extra = {"worker_claims": sum(claimed.values())}


STATE_ORDER = {"pending": 0, "running": 1, "finished": 2}


def _check_scrapyd(result: Audit, status: dict[str, str], seen: ScrapydSeen, daemons_killed: bool) -> None:
    """The Scrapyd fleet (SPEC §16): each retry scheduled exactly once by its job id. Scrapyd never
    listed one id twice in an answer, nor a job going back (finished, then pending or running
    again: scheduled anew while Scrapyd knew it), and no spider ran one job twice. The one
    rescheduling SPEC §16 allows: a retry whose delivering process died (a daemon was killed)
    whose job the restarted Scrapyd no longer knew (it keeps finished and running jobs in
    memory only) — counted, not a violation. Every job was a retry of the table, and no
    completion a spider wrote was overwritten."""
    listed_twice = sorted({s.job for s in seen.sightings if s.listed > 1})
    result.check(not listed_twice, f"job ids Scrapyd listed twice (scheduled twice): {listed_twice[:5]}")
    went_back, forgotten = set(), set()
    last: dict[str, tuple[int, int]] = {}  # job -> (lifetime, state rank) last seen
    for sighting in sorted(seen.sightings, key=lambda s: s.at):
        rank = STATE_ORDER[sighting.state]
        before = last.get(sighting.job)
        if before is not None and before[1] > rank and before[1] > 0:  # finished/running before, now earlier
            if before[0] == sighting.lifetime or not daemons_killed:
                went_back.add(sighting.job)
            else:
                forgotten.add(sighting.job)
        last[sighting.job] = (sighting.lifetime, rank)
    result.check(not went_back, f"jobs Scrapyd knew that were scheduled again: {sorted(went_back)[:5]}")
    spiders = [line.split() for line in _lines(seen.spider_log)]
    starts = Counter(parts[1] for parts in spiders if parts and parts[0] == "start")
    twice = sorted(job for job, n in starts.items() if n > 1 and job not in forgotten)
    result.check(not twice, f"jobs a spider ran twice: {twice[:5]}")
    unknown = sorted({s.job for s in seen.sightings if s.job not in status} | {j for j in starts if j not in status})
    result.check(not unknown, f"Scrapyd jobs of no retry: {unknown[:5]}")
    written = [parts[1] for parts in spiders if parts and parts[0] == "completed"]
    turned = [job for job in written if status.get(job) != "completed"]
    result.check(not turned, f"completions a spider wrote were overwritten: {turned[:5]}")
    result.totals_extra = {
        "scrapyd_jobs": len({s.job for s in seen.sightings} | set(starts)),
        "spider_runs": sum(starts.values()),
        "spider_completions": len(written),
        "rescheduled_after_scrapyd_forgot": len(forgotten),
    }


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def figures_lines(keys: tuple[str, ...], totals: dict, events: dict, violations: list, heading: str) -> list[str]:
    """A report's table rows (the totals named by `keys`, then every event) and its violations
    under `heading`: the same for every kind's report."""
    lines = [f"| {key.replace('_', ' ')} | {totals.get(key, 0):,} |" for key in keys]
    lines += [f"| {event} | {count:,} |" for event, count in sorted(events.items())]
    lines += ["", heading, ""]
    return lines + ([f"- trial seed {s}: {v}" for s, v in violations] or ["None."])
