"""`stats --by target|kind|COLUMN` (SPEC §15) against a count made by hand in Python, on one table
of several hosts (the database is shared by the module: the tests only read it)."""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
from collections import Counter, defaultdict
from datetime import datetime, timedelta, timezone
from urllib.parse import urlsplit

import pytest
import sqlalchemy as sa

from db.messages import STUCK_PATTERN
from jobs.targets import stats_by, worst_retry_target
from tests.cli import run
from tests.conftest import Databases
from tests.helpers import make_runtime
from tests.web import READER, InProcessWeb

NOW = datetime.now(timezone.utc)
WINDOW = timedelta(days=7)
TARGET = "host(start_url)"
# Spellings of five hosts: case, ports, user info, no scheme; and a value with no host at all.
URLS = {
    "shop.example.com": ("https://shop.example.com/p/1", "HTTPS://Shop.Example.COM:8443/p?x=1"),
    "jobs.example.org": ("http://user:secret@jobs.example.org/search", "https://jobs.example.org"),
    "news.example.net": (
        "news.example.net/today",
        "http://news.example.net:80/",
        "news.example.net/?next=http://x.example/",
    ),
    "api.example.io": ("https://api.example.io/v1/items#top", "https://api.example.io?page=2"),
    "slow.example.dev": ("https://slow.example.dev/a", "https://SLOW.example.dev/b"),
    None: ("", "/relative/path"),
}
PATTERNS = (STUCK_PATTERN, "timeout", "http_503", "not_found")


def hand_host(url: str) -> str | None:
    """The host as a person reads it off the URL (urllib's parser, not the SQL's pattern)."""
    if not url or url.startswith("/"):
        return None
    return urlsplit(url if re.match(r"[A-Za-z][A-Za-z0-9+.-]*://", url) else "//" + url).hostname


# No time of a row within this of the window's start: the command counts from its own now(), the
# hand count from NOW (the module's import); on a loaded machine a test runs many minutes after it.
GUARD = timedelta(hours=2)


def near_the_window_s_start(attempts: list[dict]) -> bool:
    edge = NOW - WINDOW
    times = [a.get(name) for a in attempts for name in ("started_at", "completed_at", "next_retry_at")]
    return any(t is not None and abs(t - edge) < GUARD for t in times)


def chains(rng: random.Random) -> list[list[dict]]:
    """Chains of attempts: a first run and its retries, started over the last nine days, none at
    the window's start (GUARD)."""
    made: list[list[dict]] = []
    while len(made) < 160:
        chain = one_chain(rng)
        if not near_the_window_s_start(chain):
            made.append(chain)
    return made


def one_chain(rng: random.Random) -> list[dict]:
    """One chain: a first run and its retries, at times relative to NOW."""
    host = rng.choice(list(URLS))
    url = rng.choice(URLS[host])
    start = NOW - timedelta(hours=rng.uniform(0.5, 9 * 24))
    first = {"start_url": url, "search_query": f"q{rng.randrange(4)}", "started_at": start}
    roll = rng.random()
    if roll < 0.15:
        return [{**first, "status": "running"}]
    if roll < 0.35:
        return [{**first, "status": "completed", "completed_at": start + timedelta(minutes=20)}]
    if roll < 0.42:  # failed by the scraper itself, never handled
        return [{**first, "status": "failed", "completed_at": start + timedelta(minutes=5)}]
    attempts = [{**first, "status": "failed", "failure_pattern": rng.choice(PATTERNS)}]
    attempts[0]["completed_at"] = start + timedelta(hours=1)
    for number in range(1, rng.randrange(1, 5)):
        at = attempts[-1]["completed_at"] + timedelta(hours=rng.uniform(0.5, 20))
        retry = {**first, "started_at": at, "is_retry": True, "retry_count": number}
        last = rng.random()
        if last < 0.15 and at < NOW:
            attempts.append({**retry, "status": "pending_retry", "started_at": None, "next_retry_at": at})
            break
        if last < 0.45:
            attempts.append({**retry, "status": "completed", "completed_at": at + timedelta(minutes=30)})
            break
        attempts.append(
            {
                **retry,
                "status": "failed",
                "completed_at": at + timedelta(hours=1),
                "failure_pattern": rng.choice(PATTERNS),
            }
        )
    return attempts


@pytest.fixture(scope="module")
def table(server_url: str, templates: dict[str, str]):
    databases = Databases(server_url)
    url = databases.create(templates["text_tz"])
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    with engine.begin() as conn:
        conn.exec_driver_sql("ALTER TABLE scrape_runs ADD COLUMN start_url TEXT")
        for attempts in chains(random.Random(22)):
            root = None
            for attempt in attempts:
                values = {"location_query": "Belgium", "original_run_id": root, **attempt}
                if not attempt.get("is_retry"):
                    values.pop("original_run_id")
                names = ", ".join(values)
                params = ", ".join(f":{name}" for name in values)
                run_id = conn.execute(
                    sa.text(f"INSERT INTO scrape_runs ({names}) VALUES ({params}) RETURNING id"), values
                ).scalar_one()
                root = root or run_id
        rows = [dict(r) for r in conn.execute(sa.text("SELECT * FROM scrape_runs")).mappings()]
    engine.dispose()
    yield url, rows
    databases.drop_all()


def hand_count(rows: list[dict], group_of) -> dict:
    """Per group, by the definitions README's "Stats by target" gives, one row at a time."""
    since = NOW - WINDOW
    chain_rows = defaultdict(list)
    for r in rows:
        chain_rows[r["original_run_id"] if r["is_retry"] else r["id"]].append(r)
    counts: dict = defaultdict(lambda: {"runs": 0, "stuck": 0, "retries": 0, "succeeded": 0, "permanently_failed": 0})
    patterns: dict = defaultdict(Counter)
    for r in rows:
        g = counts[group_of(r)]
        handled = r["is_retry"] or r["failure_pattern"] is not None
        ended = handled and r["completed_at"] is not None and r["completed_at"] >= since
        if r["started_at"] is not None and r["started_at"] >= since:
            g["runs"] += 1
        if not ended:
            continue
        if r["failure_pattern"] is not None:
            patterns[group_of(r)][r["failure_pattern"]] += 1
        g["stuck"] += r["failure_pattern"] == STUCK_PATTERN
        if r["is_retry"] and r["status"] in ("completed", "failed"):
            g["retries"] += 1
            g["succeeded"] += r["status"] == "completed"
        chain = chain_rows[r["original_run_id"] if r["is_retry"] else r["id"]]
        last = max(a["retry_count"] for a in chain) == r["retry_count"]
        if r["status"] == "failed" and last and not any(a["status"] == "completed" for a in chain):
            g["permanently_failed"] += 1
    for group, found in patterns.items():
        top = sorted(found.items(), key=lambda item: (-item[1], item[0]))[0]
        counts[group]["top_pattern"], counts[group]["top_pattern_failures"] = top
    for g in counts.values():
        g.setdefault("top_pattern", None)
        g.setdefault("top_pattern_failures", 0)
    return {
        group: g
        for group, g in counts.items()
        if any(g[k] for k in ("runs", "stuck", "retries", "top_pattern_failures"))
    }


def worst_first(groups: dict) -> list:
    def rank(item):
        name, g = item
        return (
            -g["permanently_failed"],
            -(g["retries"] - g["succeeded"]),
            -g["stuck"],
            -g["runs"],
            name is None,
            name or "",
        )

    return [name for name, _ in sorted(groups.items(), key=rank)]


def cli(url: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    base = {name: os.environ[name] for name in ("PATH", "HOME") if name in os.environ}
    return run(list(args), env={**base, "DATABASE_URL": url, **env})


COUNTED = ("runs", "stuck", "retries", "succeeded", "permanently_failed", "top_pattern", "top_pattern_failures")


def test_stats_by_target_matches_a_hand_count_worst_first(table):
    url, rows = table
    expected = hand_count(rows, lambda r: hand_host(r["start_url"]))
    assert len(expected) == 6  # the five hosts and the runs without one
    result = cli(url, "stats", "--by", "target", "--limit", "100", "--json", TARGET=TARGET)
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    found = {g["group"]: {k: g[k] for k in COUNTED} for g in answer["groups"]}
    assert found == expected
    assert [g["group"] for g in answer["groups"]] == worst_first(expected)
    assert answer["key"] == TARGET and answer["by"] == "target"
    # The groups add up to `stats`' own totals: one population.
    totals = json.loads(cli(url, "stats", "--json").stdout)
    assert sum(g["retries"] for g in answer["groups"]) == totals["retries"]
    assert sum(g["permanently_failed"] for g in answer["groups"]) == totals["permanently_failed"]
    assert sum(g["stuck"] for g in answer["groups"]) == totals["stuck_detections"]


def test_stats_by_a_column_table_and_limit(table):
    url, rows = table
    expected = hand_count(rows, lambda r: r["search_query"])
    answer = json.loads(cli(url, "stats", "--by", "search_query", "--json").stdout)
    assert {g["group"]: {k: g[k] for k in COUNTED} for g in answer["groups"]} == expected
    text = cli(url, "stats", "--by", "target", "--limit", "2", TARGET=TARGET)
    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    assert lines[0].startswith("Since ") and "by host(start_url), worst first (most permanently failed" in lines[0]
    assert lines[1].split()[:3] == ["TARGET", "RUNS", "STUCK"]
    assert len(lines) == 4  # the title, the header and the two worst


def test_the_api_and_the_stats_page_show_the_same_groups(table):
    url, rows = table
    cli_groups = json.loads(cli(url, "stats", "--by", "target", "--json", TARGET=TARGET).stdout)["groups"]
    web = InProcessWeb(url, TARGET=TARGET)
    try:
        with web.client(READER) as http:
            api = http.get("/api/stats", params={"by": "target"}).json()
            page = http.get("/stats", headers={"Accept": "text/html"})
            bad = http.get("/api/stats", params={"by": "nosuch"})
    finally:
        web.stop()
    assert api["success"] and api["data"]["groups"] == cli_groups
    assert page.status_code == 200 and 'id="by-target"' in page.text
    worst = cli_groups[0]["group"]
    assert f'href="/runs?target={worst}&amp;since=7d">{worst}</a>' in page.text
    assert bad.status_code == 400 and "nosuch is not a column of scrape_runs" in bad.json()["error"]
    # The link's page lists that target's runs started in the window, and no other's.
    expected = {
        str(r["id"])
        for r in rows
        if hand_host(r["start_url"]) == worst and r["started_at"] and r["started_at"] >= NOW - WINDOW
    }
    assert len(expected) > 20
    web = InProcessWeb(url, TARGET=TARGET)
    try:
        with web.client(READER) as http:
            listed, link = set(), f"/runs?target={worst}&since=7d"
            while link:
                runs_page = http.get(link, headers={"Accept": "text/html"})
                assert runs_page.status_code == 200, runs_page.text
                listed |= set(re.findall(r'href="/runs/([0-9a-f-]{36})"', runs_page.text))
                later = re.search(r'href="(/runs\?[^"]*cursor=[^"]*)"[^>]*>(?:Older|Next)', runs_page.text)
                link = later[1].replace("&amp;", "&") if later else None
            api = http.get("/api/runs", params={"target": worst, "since": "7d", "limit": 500}).json()
            unset = InProcessWeb(url)
            try:
                with unset.client(READER) as other:
                    refused = other.get("/api/runs", params={"target": worst})
            finally:
                unset.stop()
    finally:
        web.stop()
    assert listed == expected
    assert {str(r["id"]) for r in api["data"]} == expected
    assert refused.status_code == 400 and "a target filter needs TARGET" in refused.json()["error"]


def test_worst_retry_target_names_the_host_whose_retries_fail(table):
    url, rows = table
    rt = make_runtime(url, target=TARGET)
    try:
        whole = {g.group: g for g in stats_by(rt, "target", WINDOW, limit=100).groups}
        bad = [g for g in whole.values() if g.retries >= 3 and g.failed > 0.5 * g.retries]
        worst = worst_retry_target(rt, since=WINDOW, min_retries=3, failure_rate=0.5)
        none = worst_retry_target(rt, since=WINDOW, min_retries=10_000)
    finally:
        rt.close()
    assert bad, "the data holds a target whose retries fail"
    assert worst == max(bad, key=lambda g: (g.failed, g.retries))
    assert none is None


@pytest.mark.parametrize(
    ("args", "env", "fragment"),
    [
        (["--by", "target"], {"TARGET": "nosuch"}, "TARGET=nosuch: nosuch is not a column of scrape_runs; use one of"),
        (["--by", "target"], {"TARGET": "host(user_id)"}, "TARGET=host(user_id): user_id is of type INTEGER, not text"),
        (["--by", "target"], {"TARGET": "host(start_url"}, "TARGET='host(start_url' is not accepted"),
        (["--by", "target"], {}, "--by target needs TARGET: set TARGET=COLUMN or TARGET=host(URL_COLUMN)"),
        (["--by", "nosuch"], {}, "--by nosuch: nosuch is not a column of scrape_runs"),
        (["--by", "kind"], {}, "--by kind: the table maps no kind; set COLUMN_MAP=kind=COLUMN"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(table, args, env, fragment):
    url, _ = table
    result = cli(url, "stats", *args, **env)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and fragment in lines[0], result.stderr
    assert result.stdout == ""


def test_a_bad_target_is_refused_by_every_command_at_its_start(table):
    """Not only `stats --by target`: a daemon or `serve` would otherwise start and fail later."""
    url, _ = table
    for command in (["status"], ["stats", "--by", "search_query"]):
        result = cli(url, *command, TARGET="host(user_id)")
        assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
        assert "TARGET=host(user_id): user_id is of type INTEGER, not text" in result.stderr


def test_doctor_names_a_target_it_cannot_group_by(table):
    url, _ = table
    good = cli(url, "doctor", TARGET=TARGET)
    bad = cli(url, "doctor", TARGET="host(user_id)")
    assert "✓ target: stats --by target groups runs by host(start_url)" in good.stdout, good.stdout
    assert bad.returncode == 1
    assert "✗ target: TARGET=host(user_id): user_id is of type INTEGER, not text" in bad.stdout, bad.stdout
