"""Retries handed to a real Scrapyd (SPEC §16), beside the same Scrapyd driven by a bare client.

    python -m bench.scrapyd [--retries 10000] [--cap 100]

The Scrapyd column of bench/handover.py (`python -m bench.handover --engines scrapyd`), kept under
its first name: one way to start each engine and to measure it, there.
"""

from __future__ import annotations

import argparse

from bench import handover


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.scrapyd")
    parser.add_argument("--retries", type=int, default=10_000)
    parser.add_argument("--cap", type=int, default=100)
    args = parser.parse_args()
    handover.main(["--engines", "scrapyd", "--plan", f"{args.cap}:{args.retries}"])


if __name__ == "__main__":
    main()
