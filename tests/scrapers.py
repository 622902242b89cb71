"""Callables for SCRAPE_RUN_CALLABLE in tests (imported in a spawned process)."""

import os
import subprocess
import sys
import time
from pathlib import Path


class RateLimited(Exception):
    retry_after = 3600


def succeed(run):
    return None


def fail_503(run):
    raise RuntimeError(f"HTTP 503 Service Unavailable while scraping {run.inputs['search_query']}")


def rate_limited(run):
    raise RateLimited("HTTP 429 Too Many Requests")


def hang(run):
    time.sleep(600)


def spawn_and_hang(run):
    """Starts a child of its own (a browser, say), writes its pid, and hangs."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    Path(os.environ["FAKE_SCRAPER_LOG"], f"{run.id}.child").write_text(str(child.pid))
    time.sleep(600)
