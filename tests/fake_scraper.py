"""A stand-in scraper for tests: a real program the command executor runs.

It records its argv and SCRAPE_RUN_* environment in $FAKE_SCRAPER_LOG/<run id>.json, then
behaves as its search query says: `ok...` succeeds, `fail503...` fails with a 503, `404...`
with a 404, `ratelimited...` with a Retry-After, `hang...` never finishes (with a child of its
own, to prove the whole group is killed), `slow...` takes a second, `leak...` succeeds leaving behind a child that ignores SIGTERM.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path


def write_record(path: Path, record: dict) -> None:
    """Whole or not at all: a test waits for the file to exist, then reads it."""
    partial = path.with_name(path.name + ".part")
    partial.write_text(json.dumps(record))
    os.replace(partial, path)


query = os.environ.get("SCRAPE_RUN_SEARCH_QUERY", "")
log_dir = os.environ.get("FAKE_SCRAPER_LOG")
if log_dir:
    record = {
        "argv": sys.argv[1:],
        "env": {k: v for k, v in os.environ.items() if k.startswith("SCRAPE_RUN_")},
        "pid": os.getpid(),
    }
    if query.startswith("hang") and not query.startswith("hangonce"):
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        record["child_pid"] = child.pid
    if query.startswith("leak"):
        ready = Path(log_dir, "leak-ready")
        stubborn = "import pathlib, signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        stubborn += "pathlib.Path(sys.argv[1]).touch(); time.sleep(600)"
        child = subprocess.Popen([sys.executable, "-c", stubborn, str(ready)])
        record["child_pid"] = child.pid
        while not ready.exists():
            time.sleep(0.01)
    write_record(Path(log_dir, f"{os.environ['SCRAPE_RUN_ID']}.json"), record)

if query.startswith("hangonce"):
    marker = Path(log_dir or "/tmp", f"hung-{os.environ['SCRAPE_RUN_ORIGINAL_RUN_ID']}")
    if not marker.exists():
        marker.touch()
        time.sleep(600)
elif query.startswith("hang"):
    time.sleep(600)
if query.startswith("slow"):
    started = time.time()
    time.sleep(1)
    if log_dir:
        record["started"], record["ended"] = started, time.time()
        write_record(Path(log_dir, f"{os.environ['SCRAPE_RUN_ID']}.json"), record)
if query.startswith("fail503"):
    print("fetching page 1", file=sys.stderr)
    print("requests.exceptions.HTTPError: 503 Server Error: Service Unavailable", file=sys.stderr)
    sys.exit(1)
if query.startswith("404"):
    print("HTTP Error 404: Not Found", file=sys.stderr)
    sys.exit(2)
if query.startswith("ratelimited"):
    print("HTTP 429 Too Many Requests\nRetry-After: 7200", file=sys.stderr)
    sys.exit(1)
sys.exit(0)
