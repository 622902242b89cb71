"""Catalog questions `stuck-runs doctor` asks: server, clock, indexes, privileges."""

from __future__ import annotations

from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from db.alerts import ALERTS
from db.daemons import DAEMONS, JOB_RUNS
from db.engine import database_errors
from db.migration_plan import index_names, quote_table
from db.pauses import PAUSES
from db.reflect import DEAD_LETTERS_TABLE, split_name

MIN_SERVER_VERSION = 130000  # gen_random_uuid() is built in from PostgreSQL 13


def server(conn: Connection) -> tuple[int, str, str, datetime]:
    """(server_version_num, version string, current_user, the server's now())."""
    row = conn.exec_driver_sql(
        "SELECT current_setting('server_version_num')::int, current_setting('server_version'), current_user, now()"
    ).one()
    return row[0], row[1], row[2], row[3]


def index_state(conn: Connection, qualified: str) -> dict[str, bool | None]:
    """Each index the sweeps need: True valid, False invalid (a failed build), None missing."""
    schema, _ = split_name(qualified)
    names = list(index_names(qualified).values())
    found = dict(
        conn.execute(
            sa.text(
                "SELECT c.relname, i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
                "JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE c.relname = ANY (:names) AND n.nspname = coalesce(:schema, current_schema())"
            ),
            {"names": names, "schema": schema},
        ).all()
    )
    return {name: found.get(name) for name in names}


def missing_privileges(
    conn: Connection, qualified: str, dead_letters: str = DEAD_LETTERS_TABLE, id_sequence: str | None = None
) -> list[str]:
    """The table privileges stuck-runs needs and the connected role lacks, as 'PRIV on table'
    (and USAGE on `id_sequence`, which numbers the retries of an integer-id table)."""
    schema, _ = split_name(qualified)
    prefix = f"{schema}." if schema else ""
    wanted = {
        qualified: ("SELECT", "INSERT", "UPDATE"),
        f"{prefix}{dead_letters}": ("SELECT", "INSERT", "UPDATE", "DELETE"),
        f"{prefix}{DAEMONS}": ("SELECT", "INSERT", "UPDATE"),
        f"{prefix}{JOB_RUNS}": ("SELECT", "INSERT", "UPDATE"),
        # Every claim reads it; pause and resume write it.
        f"{prefix}{PAUSES}": ("SELECT", "INSERT", "UPDATE", "DELETE"),
        # Notifications (SPEC §15) record what waits and claim what is due there.
        f"{prefix}{ALERTS}": ("SELECT", "INSERT", "UPDATE"),
    }
    lacking = []
    if (
        id_sequence
        and not conn.execute(
            sa.text("SELECT has_sequence_privilege(current_user, :s, 'USAGE')"), {"s": id_sequence}
        ).scalar_one()
    ):
        lacking.append(f"USAGE on sequence {id_sequence}")
    for table, privileges in wanted.items():
        relation = quote_table(conn.dialect, table)
        exists = conn.execute(sa.text("SELECT to_regclass(:r) IS NOT NULL"), {"r": relation}).scalar_one()
        if not exists:
            continue
        for privilege in privileges:
            allowed = conn.execute(
                sa.text("SELECT has_table_privilege(current_user, CAST(:r AS regclass), :p)"),
                {"r": relation, "p": privilege},
            ).scalar_one()
            if not allowed:
                lacking.append(f"{privilege} on {table}")
        if table == qualified or table.endswith((PAUSES, ALERTS)):  # keyed by the runs table's name, no sequence
            continue
        # Our own tables number their rows with a sequence, which an INSERT must be allowed to use.
        sequence = conn.execute(sa.text("SELECT pg_get_serial_sequence(:r, 'id')"), {"r": relation}).scalar_one()
        if sequence:
            usable = conn.execute(
                sa.text("SELECT has_sequence_privilege(current_user, :s, 'USAGE')"), {"s": sequence}
            ).scalar_one()
            if not usable:
                lacking.append(f"USAGE on sequence {sequence}")
    return lacking


def scrapers_time_zone(url: str) -> str:
    """The TimeZone a session gets without asking for one (server, database and role settings): what
    the scraper's own sessions see. stuck-runs' sessions ask for UTC, so this takes a plain one."""
    engine = sa.create_engine(
        url, poolclass=sa.pool.NullPool, connect_args={"connect_timeout": 10, "application_name": "stuck-runs doctor"}
    )
    try:
        with database_errors(engine, "reading the scrapers' TimeZone"), engine.connect() as conn:
            return conn.exec_driver_sql("SELECT current_setting('TimeZone')").scalar_one()
    finally:
        engine.dispose()


def naive_columns_off_utc(zone: str, table: sa.Table, names: list[str]) -> list[str]:
    """Those of `names` that are `timestamp without time zone` when the scrapers' TimeZone is not
    UTC: stuck-runs reads them as UTC, and a scraper writing now() there writes local time."""
    if zone.upper() in ("UTC", "ETC/UTC", "GMT", "UCT", "ZULU", "ETC/UCT", "ETC/GMT"):
        return []
    return [n for n in names if isinstance(table.c[n].type, sa.DateTime) and not table.c[n].type.timezone]
