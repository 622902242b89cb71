"""The shape of the code the issue asks for, held by tests: db/ depends on nothing above it, and no
module but the mapping's own spells a column's or a status's name in SQL."""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent
# Where the table's names are resolved (db.table, db.shape, db.layout) or rendered into DDL from
# the resolved plan (db.migrate and its revisions); the demo owns its scraper's table.
MAPPING_MODULES = {"db/table.py", "db/shape.py", "db/layout.py", "db/migrate.py", "scheduler/demo.py"}
SQL_NAMES = re.compile(
    r"""\bstatus\s*(=|<>|!=|\bIN\b)\s*['(]|[=(,]\s*'(running|completed|failed|pending_retry|cancelled)'"""
    r"""|\b(search_query|location_query|started_at|completed_at|error_message)\b\s*(=|<|>|IS\b)"""
    r"""|\bSELECT\b[^;]*\b(search_query|location_query|started_at|completed_at|error_message)\b[^;]*\bFROM\b""",
    re.IGNORECASE,
)


def modules(*folders: str) -> list[Path]:
    return sorted(p for folder in folders for p in (REPO / folder).rglob("*.py"))


def imported(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_db_imports_nothing_from_the_layers_above_it():
    offenders = {
        str(path.relative_to(REPO)): sorted(n for n in imported(path) if n.split(".")[0] in ("jobs", "scheduler"))
        for path in modules("db")
    }
    assert {path: names for path, names in offenders.items() if names} == {}


def string_constants(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text())
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    return [
        (node.lineno, node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
    ]


def test_no_module_outside_the_mapping_spells_a_column_or_a_status_in_sql():
    found = [
        f"{path.relative_to(REPO)}:{line}: {text[:80]!r}"
        for path in modules("db", "jobs", "scheduler")
        if str(path.relative_to(REPO)) not in MAPPING_MODULES
        for line, text in string_constants(path)
        if SQL_NAMES.search(text)
    ]
    assert found == []


def test_the_check_sees_sql_that_names_a_status():
    """The pattern above is not blind: it finds what the old code had."""
    for old in (
        "UPDATE scrape_runs SET started_at = now() WHERE status = 'running' AND started_at IS NULL",
        "SELECT id, search_query, location_query, error_message FROM scrape_runs WHERE failure_pattern = 'stuck'",
        "SELECT count(*) FROM scrape_runs WHERE status IN ('running', 'pending_retry')",
    ):
        assert SQL_NAMES.search(old), old
