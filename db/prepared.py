"""A statement prepared once on a session and executed many times: `PREPARE name (types) AS ...`.

The sweep runs one big statement per batch (about a hundred batches in a mass event of 100,000
runs). Sent as text each time, the server parsed, analysed and planned it again for every batch
(about 1.3 ms of its CPU a batch, bench.limits). Prepared, the parameters that stay the same for a
whole sweep (its clock, limits, policy) are bound once into the PREPARE as the literals psycopg2
writes anyway (so partial indexes' predicates still match and constants fold as before), and only
the few that change per batch are `$n` parameters of EXECUTE; after five executions PostgreSQL
keeps its generic plan.

Prepared statements belong to the session, not to a transaction (a rollback keeps them): whoever
prepares ends them (`DEALLOCATE_ALL`) before the session goes back to the pool, or the next
PREPARE of the same name there fails. A session that ends takes them along.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.base import Executable
from sqlalchemy.sql.elements import ClauseElement
from sqlalchemy.sql.visitors import InternalTraversal

# Every statement this process prepared on a session, ended at once (nothing else prepares any).
DEALLOCATE_ALL = sa.text("DEALLOCATE ALL")


class Prepare(Executable, ClauseElement):
    """`PREPARE name (types) AS statement; EXECUTE name (:p1, …)`: the statement's bind
    parameters are bound now, once; its `$1`, `$2`… (`placeholder`) by `p1`, `p2`… here (its first
    execution, in the same round trip) and at each `execute` after. `before`: SQL sent ahead of
    each execution in its round trip (`execute` with the same `before` for the others)."""

    inherit_cache = True
    _traverse_internals = [
        ("name", InternalTraversal.dp_string),
        ("types", InternalTraversal.dp_string_list),
        ("statement", InternalTraversal.dp_clauseelement),
        ("before", InternalTraversal.dp_string),
    ]

    def __init__(self, name: str, types: Sequence[str], statement: ClauseElement, before: str = "") -> None:
        self.name, self.types, self.statement, self.before = name, list(types), statement, before

    def execute(self) -> sa.TextClause:
        """`EXECUTE` of this statement once prepared, with what comes before it."""
        return execute(self.name, len(self.types), before=self.before)


@compiles(Prepare, "postgresql")
def _prepare(element: Prepare, compiler, **kw) -> str:  # noqa: ANN001 - SQLAlchemy's signature
    name, body = _quote(element.name), compiler.process(element.statement, **kw)
    args = ", ".join(compiler.process(sa.bindparam(f"p{n}"), **kw) for n in range(1, len(element.types) + 1))
    before = f"{element.before}; " if element.before else ""
    return f"{before}PREPARE {name} ({', '.join(element.types)}) AS {body}; EXECUTE {name} ({args})"


def placeholder(number: int, kind: sa.types.TypeEngine) -> sa.ColumnElement:
    """The prepared statement's `$number` parameter, of `kind`."""
    return sa.literal_column(f"${number}", kind)


def execute(name: str, count: int, before: str = "") -> sa.TextClause:
    """`EXECUTE name (:p1, …)`: bind `p1`… in the order of the `$n` (`before`: SQL sent ahead of it)."""
    args = ", ".join(f":p{n}" for n in range(1, count + 1))
    return sa.text(f"{before}; " * bool(before) + f"EXECUTE {_quote(name)} ({args})")


def _quote(name: str) -> str:
    return postgresql.dialect().identifier_preparer.quote(name)
