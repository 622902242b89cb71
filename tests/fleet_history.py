"""A real-looking fleet's history for learned limits (SPEC §14), inserted set-based: three spiders
of very different lengths, one with too few runs, runs failed as stuck, runs running now.

Every runtime is a formula of the run's number `g`, written twice: once in SQL (the rows) and once
in Python (`FLEET`'s `runtime`), so a test can count by hand what the SQL must count.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

import sqlalchemy as sa

NOW = datetime(2026, 11, 20, 12, 0, tzinfo=timezone.utc)
WINDOW = timedelta(days=30)


@dataclass(frozen=True)
class Spider:
    kind: str
    runs: int  # completed runs, numbered g = 1..runs
    base: int  # seconds
    spread: int  # seconds: runtime = base + (g * 37) % spread
    every: int  # seconds between two completions, the newest NOW - every: beyond WINDOW is history

    def runtime(self, g: int) -> int:
        return self.base + (g * 37) % self.spread

    def completed_ago(self, g: int) -> int:
        return g * self.every

    def in_window(self, window: timedelta = WINDOW) -> list[int]:
        """The runtimes (seconds) of the completed runs inside `window`."""
        return [self.runtime(g) for g in range(1, self.runs + 1) if self.completed_ago(g) <= window.total_seconds()]

    def sql(self, table: str = "scrape_runs", kind_column: str = "spider") -> str:
        return (
            f"INSERT INTO {table} (search_query, location_query, status, {kind_column}, started_at, completed_at)"
            f" SELECT 'crawl ' || g, 'web', 'completed', '{self.kind}',"
            f" :now - (g * {self.every} + {self.base} + (g * 37) % {self.spread}) * interval '1 second',"
            f" :now - (g * {self.every}) * interval '1 second'"
            f" FROM generate_series(1, {self.runs}) g"
        )


# jobs_de: 3-9 minutes; shop_fr: 30-50 minutes; sitemap_full: 5-7 hours; rare_spider: 12 runs only.
FLEET = (
    Spider("jobs_de", 4000, 180, 360, 700),  # 3,702 inside 30 days, the rest older
    Spider("shop_fr", 1500, 1800, 1200, 1700),
    Spider("sitemap_full", 240, 18000, 7200, 10800),
    Spider("rare_spider", 12, 600, 300, 86400),
)
# Runs failed as stuck (the checker's failure_pattern), by kind: (number, ran seconds when failed).
STUCK = {"jobs_de": (5, 8 * 3600 + 120), "sitemap_full": (2, 8 * 3600 + 300)}
RUNNING = {"jobs_de": (3, 240), "sitemap_full": (1, 4 * 3600)}  # (number, oldest started seconds ago)


def insert_fleet(conn: sa.Connection, table: str = "scrape_runs", kind_column: str = "spider") -> None:
    for spider in FLEET:
        conn.execute(sa.text(spider.sql(table, kind_column)), {"now": NOW})
    for kind, (count, ran) in STUCK.items():
        conn.execute(
            sa.text(
                f"INSERT INTO {table} (search_query, location_query, status, {kind_column}, started_at,"
                " completed_at, error_message, failure_pattern)"
                " SELECT 'hung ' || g, 'web', 'failed', :kind, :now - g * interval '1 day' - :ran * interval '1 second',"
                " :now - g * interval '1 day', 'Run stuck for 3.0h', 'stuck' FROM generate_series(1, :n) g"
            ),
            {"now": NOW, "kind": kind, "ran": ran, "n": count},
        )
    for kind, (count, oldest) in RUNNING.items():
        conn.execute(
            sa.text(
                f"INSERT INTO {table} (search_query, location_query, status, {kind_column}, started_at)"
                " SELECT 'live ' || g, 'web', 'running', :kind, :now - :oldest * interval '1 second' / g"
                " FROM generate_series(1, :n) g"
            ),
            {"now": NOW, "kind": kind, "oldest": oldest, "n": count},
        )


def percentile(values: list[int], fraction: float) -> float:
    """percentile_cont, by hand: linear interpolation between the two nearest ranks."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * fraction
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)
