"""`python -m scheduler` is `stuck-runs`."""

from scheduler.cli import main

main()
