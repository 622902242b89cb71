"""Callables for SCRAPE_RUN_CALLABLE in tests (imported in a spawned process)."""

import time


class RateLimited(Exception):
    retry_after = 3600


def succeed(run):
    return None


def fail_503(run):
    raise RuntimeError(f"HTTP 503 Service Unavailable while scraping {run.search_query}")


def rate_limited(run):
    raise RateLimited("HTTP 429 Too Many Requests")


def hang(run):
    time.sleep(600)
