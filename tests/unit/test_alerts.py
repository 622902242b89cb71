"""What a notification says and how what waits folds (jobs/alerts.py), and ALERT_URLS as Apprise
reads it (jobs/alert_urls.py): no database, no network."""

from __future__ import annotations

import pytest

from db.errors import ConfigError
from jobs import alerts
from jobs.alert_urls import hide_secrets, parse_alert_urls
from jobs.settings.notice_parsers import parse_events


def test_stuck_occurrences_add_up_and_keep_the_first_runs_labels():
    first = {"count": 8, "sweeps": 1, "kinds": {"jobs_de": 8}, "labels": [f"a{i}" for i in range(8)]}
    later = {"count": 5, "sweeps": 1, "kinds": {"jobs_de": 1, "sitemap": 4}, "labels": [f"b{i}" for i in range(5)]}
    folded = alerts.fold(alerts.STUCK, first, later)
    assert folded["count"] == 13 and folded["sweeps"] == 2
    assert folded["kinds"] == {"jobs_de": 9, "sitemap": 4}
    assert folded["labels"] == [*first["labels"], "b0", "b1"]
    assert alerts.fold(alerts.STUCK, None, later) == later


def test_permanent_occurrences_add_up_their_patterns_and_keep_three_errors():
    one = {"count": 1, "labels": ["x"], "patterns": {"stuck": 1}, "errors": ["e1", "e2"]}
    two = {"count": 2, "labels": ["y", "z"], "patterns": {"stuck": 1, "http_5xx": 1}, "errors": ["e2", "e3", "e4"]}
    folded = alerts.fold(alerts.PERMANENT, one, two)
    assert folded == {
        "count": 3,
        "labels": ["x", "y", "z"],
        "patterns": {"stuck": 2, "http_5xx": 1},
        "errors": ["e1", "e2", "e3"],
    }


@pytest.mark.parametrize("kind", [alerts.RETRY_FAILURE_RATE, alerts.CHECKER_SILENT])
def test_a_state_says_its_latest_reading(kind):
    assert alerts.fold(kind, {"ended": 10, "failed": 6}, {"ended": 12, "failed": 9}) == {"ended": 12, "failed": 9}


def test_each_message_has_its_count_and_table_in_the_title_and_links_only_with_a_public_url():
    stuck = {"count": 1, "labels": ["jobs in Belgium"], "kinds": {"jobs_de": 1}}
    title, body = alerts.message(alerts.STUCK, stuck, "public.scrape_runs")
    assert title == "1 stuck run failed in public.scrape_runs"
    assert "Kinds: jobs_de 1" in body and "• jobs in Belgium" in body and "http" not in body
    _, linked = alerts.message(alerts.STUCK, stuck, "scrape_runs", "https://ops.example/sr")
    assert linked.endswith("https://ops.example/sr/runs?status=failed")
    permanent = {"count": 2, "labels": ["a", "b"], "patterns": {"stuck": 2}, "errors": ["x" * 500]}
    title, body = alerts.message(alerts.PERMANENT, permanent, "scrape_runs", "https://ops.example")
    assert title == "2 chains permanently failed in scrape_runs"
    assert f"Last error: {'x' * alerts.ERROR_WIDTH}\n" in body and body.endswith("https://ops.example/dead-letters")
    title, body = alerts.message(alerts.RETRY_FAILURE_RATE, {"ended": 12, "failed": 7}, "scrape_runs")
    assert title == "7 of 12 retries failed in the last hour in scrape_runs" and "58%" in body
    silent = {"last_finished": "2026-12-01T07:00+00:00", "silent_for_s": 7200.0}
    title, body = alerts.message(alerts.CHECKER_SILENT, silent, "scrape_runs")
    assert title == "The stuck-run checker of scrape_runs is silent" and "No check finished for 2:00:00." in body


def test_events_are_the_four_kinds_and_nothing_else():
    assert parse_events("stuck, permanent", "ALERT_EVENTS") == {"stuck", "permanent"}
    with pytest.raises(ConfigError, match=r"ALERT_EVENTS: unknown event 'hung': use some of stuck, permanent"):
        parse_events("stuck,hung", "ALERT_EVENTS")
    with pytest.raises(ConfigError, match="names no event"):
        parse_events(" , ", "ALERT_EVENTS")


def test_apprise_splits_alert_urls_and_a_mailto_with_several_recipients_stays_whole():
    urls = parse_alert_urls(
        "slack://TokenAlpha/TokenBravo/TokenCharlie, mailto://ops:Pw-s3cret@example.com?to=a@example.com,b@x.org "
        "json://127.0.0.1:8080/hook",
        "ALERT_URLS",
    )
    assert [url.service for url in urls] == ["Slack", "E-Mail", "JSON"]
    assert urls[0].shown == "slack://T...a/T...o/T...e"
    assert "Pw-s3cret" not in urls[1].shown and "b%40x.org" in urls[1].shown
    said = "posting to slack://TokenAlpha/TokenBravo/TokenCharlie as ops:Pw-s3cret failed"
    assert hide_secrets(said, urls) == "posting to slack://…/…/… as ops:… failed"
