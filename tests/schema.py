"""Scraper tables as scrapers really have them, for tests (and the variants the SPEC names)."""

from __future__ import annotations

TEXT_STATUS = """
CREATE TABLE {table} (
    id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
    search_query TEXT NOT NULL,
    location_query TEXT NOT NULL,
    status VARCHAR(32) NOT NULL DEFAULT 'running',
    error_message TEXT,
    started_at TIMESTAMPTZ,
    completed_at TIMESTAMPTZ,
    config JSONB NOT NULL DEFAULT '{{}}',
    user_id INTEGER,
    results_count INTEGER,
    updated_at TIMESTAMPTZ
)
"""

# A PostgreSQL enum status and naive timestamps (UTC by contract).
ENUM_NAIVE = """
CREATE TYPE scrape_status AS ENUM ('running', 'completed', 'failed');
CREATE TABLE {table} (
    id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
    search_query TEXT NOT NULL,
    location_query TEXT NOT NULL,
    status scrape_status NOT NULL DEFAULT 'running',
    error_message TEXT,
    started_at TIMESTAMP WITHOUT TIME ZONE,
    completed_at TIMESTAMP WITHOUT TIME ZONE,
    config JSONB NOT NULL DEFAULT '{{}}',
    user_id INTEGER,
    results_count INTEGER,
    updated_at TIMESTAMP WITHOUT TIME ZONE
)
"""

VARIANTS = {"text_tz": TEXT_STATUS, "enum_naive": ENUM_NAIVE}
