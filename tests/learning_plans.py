"""What a learning statement did, from EXPLAIN ANALYZE: the scans of the runs table that ran (a
branch its one-time filter skipped shows as never executed, and is left out)."""

from __future__ import annotations

import sqlalchemy as sa


def executed_scans(conn: sa.Connection, sql: str, params: dict, table: str) -> list[dict]:
    """The plan nodes that scanned `table` (its name without schema) while `sql` ran."""
    [[plan]] = conn.exec_driver_sql(f"EXPLAIN (ANALYZE, FORMAT JSON, COSTS OFF, TIMING OFF) {sql}", params).one()
    scans, nodes = [], [plan["Plan"]]
    while nodes:
        node = nodes.pop()
        nodes += node.get("Plans", [])
        if node.get("Relation Name") == table and node.get("Actual Loops", 0) > 0:
            scans.append(node)
    return scans


def checks_the_window(scans: list[dict], completed_at: str = "completed_at") -> bool:
    """Whether some run read was checked against the window: a filter on its completion time."""
    return any(completed_at in scan.get("Filter", "") for scan in scans)
