"""`stuck-runs serve` on a ten-million-row table: p50 / p95 of what an operator opens.

    python -m bench.web [--rows 10000000] [--repeat 100] [--json FILE]

Builds the benchmark's realistic `scrape_runs` (bench/data.py) with `rows` runs of history,
starts a real `serve` on loopback, and asks each page or endpoint `repeat` times one after the
other (after a warm-up), reading the server's own `Server-Timing` (time in the application,
network and client apart) and the wall time the client saw. Prints JSON.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import sqlalchemy as sa

from bench import data

REPO = Path(__file__).resolve().parent.parent
TOKEN = "bench-admin-token-0123456789"


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(fraction * (len(ordered) - 1))))]


def _cursor(started_at, run_id) -> str:
    return base64.urlsafe_b64encode(json.dumps([started_at.isoformat(), str(run_id)]).encode()).decode().rstrip("=")


def targets(url: str) -> dict[str, str]:
    """What to ask: the pages (when this version has them) and the API behind them."""
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        middle = conn.execute(
            sa.text(
                "SELECT id, started_at FROM scrape_runs WHERE started_at < now() - interval '180 days' "
                "ORDER BY started_at DESC LIMIT 1"
            )
        ).one()
        # A retry of the history: its chain page reads the chain by its root, as for any run.
        chain = conn.execute(sa.text("SELECT id FROM scrape_runs WHERE is_retry LIMIT 1")).scalar_one()
    engine.dispose()
    deep = _cursor(middle.started_at, middle.id)
    found = {
        "api: runs, first page": "/api/runs",
        "api: runs, page 100,000 (cursor)": f"/api/runs?cursor={deep}",
        "api: runs, failed": "/api/runs?status=failed",
        "api: runs, search '503'": "/api/runs?q=503",
        "api: runs, search, rare text": "/api/runs?q=Warsaw&status=failed&since=7d",
        "api: runs, stuck": "/api/runs?stuck=true",
        "api: runs, newest started": "/api/runs?order=started",
        "api: runs, by due time": "/api/runs?order=due",
        "api: runs, page before page 100,000 (before)": f"/api/runs?order=started&before={deep}",
        "api: chain": f"/api/runs/{chain}",
        "api: status (overview counts)": "/api/status",
        "api: stats 7d": "/api/stats?since=7d",
    }
    try:
        import scheduler.web.pages  # noqa: F401 - the pages exist in this version

        found |= {"page: overview": "/", "page: runs": "/runs", "page: chain": f"/runs/{chain}"}
    except ImportError:
        pass
    return found


def measure(url: str, repeat: int) -> dict:
    port = 18000 + os.getpid() % 1000
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "DATABASE_URL": url,
        "ADMIN_TOKEN": TOKEN,
        "ADMIN_PORT": str(port),
        "LOG_LEVEL": "WARNING",
    }
    server = subprocess.Popen([sys.executable, "-m", "scheduler", "serve"], env=env, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    results = {}
    try:
        client = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if client.get("/api/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        for name, path in targets(url).items():
            for _ in range(5):
                client.get(path)  # warm: plans cached, pages of the index in memory
            app_ms, wall_ms, statuses = [], [], set()
            for _ in range(repeat):
                started = time.perf_counter()
                answer = client.get(path)
                wall_ms.append((time.perf_counter() - started) * 1000)
                statuses.add(answer.status_code)
                app_ms.append(float(answer.headers["server-timing"].split("dur=")[1]))
            results[name] = {
                "path": path.split("?")[0] + ("?…" if "?" in path else ""),
                "status": sorted(statuses),
                "server_p50_ms": round(statistics.median(app_ms), 1),
                "server_p95_ms": round(percentile(app_ms, 0.95), 1),
                "client_p50_ms": round(statistics.median(wall_ms), 1),
                "client_p95_ms": round(percentile(wall_ms, 0.95), 1),
            }
            print(name, results[name], flush=True)
        client.close()
    finally:
        server.terminate()
        server.wait(30)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--repeat", type=int, default=100)
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="stuck-runs-bench-web-"))
    server_url, server = data.start_server(work)
    try:
        started = time.perf_counter()
        url = data.build_template(server_url, "bench_web", history=args.rows, stuck=100, now=data.bench_now())
        print(f"built {args.rows:,} rows in {time.perf_counter() - started:.0f}s", flush=True)
        figures = {
            "rows": args.rows,
            "repeat": args.repeat,
            "when": time.strftime("%Y-%m-%d"),
            **measure(url, args.repeat),
        }
    finally:
        if server is not None:
            server.cleanup()
    text = json.dumps({"web": figures}, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text)


if __name__ == "__main__":
    main()
