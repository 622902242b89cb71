"""`stuck-runs alert test`: one test message to each ALERT_URLS URL, and what became of each."""

from __future__ import annotations

import click

from db.errors import EXIT_OK, EXIT_REFUSED, ConfigError
from jobs.alerting import send_trial
from scheduler.cli import cli, config_options, json_option, load_settings
from scheduler.cli.output import emit_json


@cli.group("alert")
def alert() -> None:
    """Notifications: `alert test` sends a test message to each ALERT_URLS URL."""


@alert.command("test")
@config_options("SCRAPE_RUNS_TABLE")
@json_option
@click.pass_context
def alert_test(ctx: click.Context, as_json: bool) -> int:
    """Send a test message to each ALERT_URLS URL; say, per URL, whether it was delivered.

    URLs are shown with their secrets masked, as Apprise masks them. Exit 1 when any message
    was not delivered. The database is not needed.

    \b
    Example:
      ALERT_URLS='slack://TokenA/TokenB/TokenC mailto://user:pass@example.com' stuck-runs alert test
    """
    settings = load_settings(ctx)
    if not settings.alert_urls:
        raise ConfigError("ALERT_URLS is not set: give it one or more notification URLs, such as slack://A/B/C")
    deliveries = send_trial(settings.alert_urls, settings.table)
    if as_json:
        emit_json(
            {
                "success": all(d.delivered for d in deliveries),
                "urls": [
                    {"url": d.url.shown, "service": d.url.service, "delivered": d.delivered, "error": d.error}
                    for d in deliveries
                ],
            }
        )
    else:
        for d in deliveries:
            outcome = "delivered" if d.delivered else f"NOT delivered: {d.error}"
            click.echo(f"{d.url.service} {d.url.shown}: {outcome}")
    return EXIT_OK if all(d.delivered for d in deliveries) else EXIT_REFUSED
