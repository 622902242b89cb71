"""Alembic environment for stuck-runs' own migrations of the scraper's table.

The table is configurable (`SCRAPE_RUNS_TABLE`), so it reaches the revisions through
`config.attributes["table"]`; the version table is stuck-runs' own, named after that table, so a
scraper that uses Alembic on the same database keeps its `alembic_version` to itself.
"""

from alembic import context

from db.migrate import version_table_for

config = context.config
table = config.attributes["table"]
version_table, version_schema = version_table_for(table)

if context.is_offline_mode():
    context.configure(
        url="postgresql://",
        dialect_name="postgresql",
        literal_binds=True,
        version_table=version_table,
        version_table_schema=version_schema,
    )
else:
    context.configure(
        connection=config.attributes["connection"],
        version_table=version_table,
        version_table_schema=version_schema,
    )

with context.begin_transaction():
    context.run_migrations()
