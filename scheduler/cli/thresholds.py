"""`stuck-runs thresholds`: each kind's runtimes, the limit in force and its evidence (SPEC §14)."""

from __future__ import annotations

import click

from db.errors import EXIT_OK
from jobs.thresholds import Thresholds, parse_what_if, span, thresholds
from scheduler.cli import LIMITS, cli, config_options, json_option, open_runtime
from scheduler.cli.output import emit_json, table, when

NO_KIND = "(no kind)"
LEGEND = """\
OVER LIMIT: completed runs that ran longer than the limit; each would have been failed while healthy.
CAUGHT: runs failed as stuck; PAST LIMIT: how long past the limit they had run when failed (median;
negative: failed before it, so the limit would have let them run on). A run's own max_runtime beats
its kind's limit."""


@cli.command("thresholds")
@click.option(
    "--what-if",
    "what_if",
    metavar="PROPOSAL",
    help="Show the same for proposed values, changing nothing: kind=duration pairs, stuck-after=, "
    "learn=on|off, learn-window=, learn-min-runs=, learn-margin=, learn-floor= (jobs_de=30m,learn-margin=3).",
)
@config_options("STUCK_AFTER", "SCRAPE_RUNS_TABLE", *LIMITS)
@json_option
@click.pass_context
def thresholds_command(ctx: click.Context, what_if: str | None, as_json: bool) -> int:
    """Each kind's runtimes, the limit in force and the evidence for choosing one.

    Per kind (COLUMN_MAP's kind): completed runs in the learning window, their p50 / p95 / p99 /
    longest runtime, the limit a run without a max_runtime of its own gets and where it comes from
    (configured, learned, default), the runs running now and the oldest; then the evidence: OVER
    LIMIT, completed runs that ran longer than the limit (each would have been failed while
    healthy), and CAUGHT, runs failed as stuck, with how long PAST the limit they had run.

    \b
    Examples:
      stuck-runs thresholds
      stuck-runs thresholds --what-if 'jobs_de=30m,learn-margin=3'
    """
    proposal = parse_what_if(what_if) if what_if is not None else None  # refused before connecting
    with open_runtime(ctx) as rt:
        result = thresholds(rt, proposal)
    if as_json:
        emit_json(result)
    else:
        show(result)
    return EXIT_OK


def show(result: Thresholds) -> None:
    kind = (result.kind_column or "kind").upper()
    learning = f"learning on ({result.learned_with})" if result.learning else "learning off"
    learned = f", runtimes as of {when(result.learned_at)}" if result.learning and result.learned_at else ""
    if result.what_if is not None:
        click.echo(f"What if {result.what_if} — nothing is changed; LIMIT NOW and OVER NOW are today's settings.")
    click.echo(
        f"Completed runs since {when(result.since)} ({span(result.window)}); default limit (STUCK_AFTER) "
        f"{span(result.default)}; {learning}{learned}."
    )
    now = result.what_if is not None
    headers = [kind, "RUNS", "P50", "P95", "P99", "LONGEST", *(("LIMIT NOW",) if now else ()), "LIMIT", "SOURCE"]
    headers += ["RUNNING", "OLDEST", *(("OVER NOW",) if now else ()), "OVER LIMIT", "CAUGHT", "PAST LIMIT"]
    rows = []
    for k in result.kinds:
        row = [k.kind if k.kind is not None else NO_KIND, f"{k.runs:,}", span(k.p50), span(k.p95), span(k.p99)]
        row += [span(k.longest), *((span(k.limit_now),) if now else ()), span(k.limit), k.source]
        row += [k.running, span(k.oldest_running), *((k.over_limit_now,) if now else ()), k.over_limit, k.caught]
        rows.append([*row, span(k.caught_past_median)])
    table(headers, rows)
    for k in result.kinds:
        if k.not_learned:
            click.echo(f"  {k.kind}: {k.not_learned}")
    click.echo(LEGEND)
