"""The database edge: engines, the reflected table, every statement, migrations."""
