"""Two versions of stuck-runs side by side, as users run them: did a change make anything slower?

    python -m bench.versions BEFORE_DIR AFTER_DIR [--repeat 5] [--stuck 100000] [--history 1000000]
                             [--web-rows 10000000] [--json FILE]

Each directory is a checkout with its own `.venv` (`pip install -e .`). On one embedded server
and the same data, interleaved run by run, each on a fresh copy of one template:

- the whole `stuck-runs check` at K stuck of the history, beside the SQL floor (bench/contenders.py);
- an idle `check` (nothing stuck: an index probe) as a child process, output included;
- `serve`'s start: from the spawn to the first 200 of `/api/health`;
- the pages and the API on `--web-rows` runs: server p95 (`Server-Timing`) of what an operator opens.

Medians of `repeat` runs; the ratios are what to read on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx

from bench import contenders, data, web


def _script(checkout: Path) -> str:
    return str(checkout / ".venv" / "bin" / "stuck-runs")


def _check(checkout: Path, url: str, now: datetime) -> float:
    """`stuck-runs check` from `checkout` as cron runs it, judging stuck-ness at `now`."""
    late = datetime.now(timezone.utc) - now
    stuck_after = (contenders.POLICY.stuck_after + late).total_seconds()
    env = {**os.environ, "DATABASE_URL": url, "STUCK_AFTER": f"{stuck_after:.6f}s"}
    with open(os.devnull, "w") as sink:
        started = time.perf_counter()
        subprocess.run([_script(checkout), "check"], env=env, stdout=sink, stderr=subprocess.STDOUT, check=True)
        return time.perf_counter() - started


def sweeps(server_url: str, versions: dict[str, Path], args: argparse.Namespace) -> dict:
    now = data.bench_now()
    template = f"bench_versions_{os.getpid()}"
    data.build_template(server_url, template, history=args.history, stuck=args.stuck, now=now)
    seconds: dict[str, list[float]] = {"floor": [], **{name: [] for name in versions}}
    failed: dict[str, set[int]] = {name: set() for name in seconds}
    for _ in range(args.repeat):
        for name in seconds:
            url, copy = data.copy_of(server_url, template)
            try:
                if name == "floor":
                    timing = contenders.floor(url, now)
                    seconds[name].append(timing.seconds)
                    failed[name].add(timing.failed)
                else:
                    seconds[name].append(_check(versions[name], url, now))
                    failed[name].add(contenders.failed_as_stuck(url))
            finally:
                data.drop(server_url, copy)
    floor = statistics.median(seconds["floor"])
    return {
        "stuck": args.stuck,
        "history": args.history,
        "median_s": {name: round(statistics.median(s), 3) for name, s in seconds.items()},
        "over_floor": {name: round(statistics.median(seconds[name]) / floor, 2) for name in versions},
        "all_s": {name: [round(x, 3) for x in s] for name, s in seconds.items()},
        "failed": {name: sorted(f) for name, f in failed.items()},
        "template": template,
    }


def idle_check(server_url: str, template: str, versions: dict[str, Path], repeat: int) -> dict:
    url, copy = data.copy_of(server_url, template)
    try:
        _check(next(iter(versions.values())), url, data.bench_now())  # fails the stuck runs: idle from here
        seconds: dict[str, list[float]] = {name: [] for name in versions}
        for _ in range(repeat):
            for name, checkout in versions.items():
                seconds[name].append(_check(checkout, url, data.bench_now()))
    finally:
        data.drop(server_url, copy)
    return {name: round(statistics.median(s), 3) for name, s in seconds.items()}


def _serve(checkout: Path, url: str, port: int) -> subprocess.Popen:
    env = {
        **os.environ,
        "DATABASE_URL": url,
        "ADMIN_TOKEN": web.TOKEN,
        "ADMIN_PORT": str(port),
        "LOG_LEVEL": "WARNING",
    }
    return subprocess.Popen([_script(checkout), "serve"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _until_healthy(client: httpx.Client, deadline: float) -> None:
    while time.monotonic() < deadline:
        try:
            if client.get("/api/health").status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.01)
    raise RuntimeError("serve did not answer /api/health within its deadline")


def serve_start(url: str, versions: dict[str, Path], repeat: int) -> dict:
    seconds: dict[str, list[float]] = {name: [] for name in versions}
    port = 19000 + os.getpid() % 500
    for _ in range(repeat):
        for name, checkout in versions.items():
            client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5)
            started = time.perf_counter()
            server = _serve(checkout, url, port)
            try:
                _until_healthy(client, time.monotonic() + 60)
                seconds[name].append(time.perf_counter() - started)
            finally:
                client.close()
                server.terminate()
                server.wait(30)
    return {name: round(statistics.median(s), 3) for name, s in seconds.items()}


def pages(server_url: str, versions: dict[str, Path], rows: int, repeat: int) -> dict:
    template = f"bench_versions_web_{os.getpid()}"
    url = data.build_template(server_url, template, history=rows, stuck=100, now=data.bench_now())
    found: dict[str, dict] = {}
    port = 19500 + os.getpid() % 400
    paths = web.targets(url)
    for name, checkout in versions.items():
        server = _serve(checkout, url, port)
        client = httpx.Client(
            base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {web.TOKEN}"}, timeout=30
        )
        try:
            _until_healthy(client, time.monotonic() + 60)
            found[name] = {}
            for what, path in paths.items():
                for _ in range(5):
                    client.get(path)
                timings = []
                for _ in range(repeat):
                    answer = client.get(path)
                    timings.append(float(answer.headers["server-timing"].split("dur=")[1]))
                found[name][what] = round(web.percentile(timings, 0.95), 1)
        finally:
            client.close()
            server.terminate()
            server.wait(30)
    data.drop(server_url, template)
    return {"rows": rows, "server_p95_ms": found}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--stuck", type=int, default=100_000)
    parser.add_argument("--history", type=int, default=1_000_000)
    parser.add_argument("--web-rows", type=int, default=10_000_000, help="0: skip the pages")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    versions = {"before": args.before.resolve(), "after": args.after.resolve()}
    work = Path(tempfile.mkdtemp(prefix="stuck-runs-bench-versions-"))
    server_url, server = data.start_server(work)
    figures: dict = {}
    try:
        figures["check"] = sweeps(server_url, versions, args)
        print(json.dumps(figures["check"]["median_s"]), figures["check"]["over_floor"], flush=True)
        figures["idle_check_s"] = idle_check(server_url, figures["check"]["template"], versions, args.repeat)
        print("idle check", figures["idle_check_s"], flush=True)
        url, copy = data.copy_of(server_url, figures["check"]["template"])
        figures["serve_start_s"] = serve_start(url, versions, args.repeat)
        data.drop(server_url, copy)
        print("serve start", figures["serve_start_s"], flush=True)
        if args.web_rows:
            figures["pages"] = pages(server_url, versions, args.web_rows, 100)
            print("pages p95", figures["pages"], flush=True)
    finally:
        if server is not None:
            server.cleanup()
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    json.dump(figures, sys.stdout, indent=2)


if __name__ == "__main__":
    main()
