"""Randomized chaos trials against a real PostgreSQL and real processes; see RELIABILITY.md."""
