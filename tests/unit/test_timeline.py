"""The pure parts of the hourly timeline and of the pages: hours filled, the chart's geometry, the
retry button's words."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from jobs.timeline import HOUR, HourCounts, HourlyTimeline, every_hour, hour_start
from scheduler.web.pages import PLOT_HEIGHT, TOP, hourly_chart, retry_label, scale_top, shown_time, spent_label

UTC = timezone.utc
T0 = datetime(2026, 5, 3, 22, 0, tzinfo=UTC)


def test_hour_start_is_the_utc_hour_whatever_the_offset():
    brussels = timezone(timedelta(hours=2))
    assert hour_start(datetime(2026, 5, 4, 1, 59, 59, 999999, tzinfo=brussels)) == datetime(2026, 5, 3, 23, tzinfo=UTC)
    assert hour_start(datetime(2026, 5, 4, 1, 0)) == datetime(2026, 5, 4, 1, tzinfo=UTC)  # naive: UTC by contract


def test_every_hour_is_present_and_the_counted_ones_keep_their_counts():
    counted = [HourCounts(T0 + HOUR, 2, 1, 3), HourCounts(T0 + 4 * HOUR, 0, 0, 1)]
    hours = every_hour(T0 + timedelta(minutes=30), T0 + 4 * HOUR + timedelta(minutes=5), counted)
    assert [h.hour for h in hours] == [T0 + n * HOUR for n in range(5)]
    assert hours[1] == counted[0] and hours[4] == counted[1]
    assert hours[0] == HourCounts(T0) and hours[2] == HourCounts(T0 + 2 * HOUR)
    assert [h.retries for h in hours] == [0, 3, 0, 0, 0]


def test_every_hour_drops_counts_outside_the_window_and_a_week_is_169_hours():
    outside = [HourCounts(T0 - HOUR, 9), HourCounts(T0 + 200 * HOUR, 9)]
    week = every_hour(T0, T0 + timedelta(days=7), outside)
    assert len(week) == 7 * 24 + 1
    assert sum(h.retries for h in week) == 0


def test_scale_top_is_a_round_number_that_holds_the_highest_hour():
    assert [scale_top(n) for n in (0, 1, 2, 3, 5, 6, 11, 20, 21, 99, 101)] == [1, 1, 2, 5, 5, 10, 20, 20, 50, 100, 200]


def test_the_chart_stacks_failed_retries_on_succeeded_ones_and_ticks_every_utc_midnight():
    hours = every_hour(T0, T0 + 5 * HOUR, [HourCounts(T0 + HOUR, 3, 1, 0), HourCounts(T0 + 3 * HOUR, 0, 0, 2)])
    chart = hourly_chart(HourlyTimeline(T0, hours))
    [bar] = chart["bars"]
    assert bar["ok_height"] == 3 / 5 * PLOT_HEIGHT and bar["failed_height"] == 1 / 5 * PLOT_HEIGHT  # top: 5
    assert bar["failed_y"] + bar["failed_height"] == bar["ok_y"]
    assert bar["ok_y"] + bar["ok_height"] == TOP + PLOT_HEIGHT
    [dot] = chart["dots"]
    assert dot["y"] == TOP + PLOT_HEIGHT - 2 / 5 * PLOT_HEIGHT
    assert "2026-05-04 01:00 UTC: 0 retries succeeded, 0 failed, 2 stuck detections" == dot["title"]
    assert [t["label"] for t in chart["ticks"]] == ["Mon 04 May"]  # 00:00 is the third hour
    assert (chart["retries"], chart["stuck"]) == (4, 2)
    assert [h["hour"] for h in chart["busy"]] == ["2026-05-03T23:00:00+00:00", "2026-05-04T01:00:00+00:00"]


def test_an_empty_week_draws_no_mark():
    chart = hourly_chart(HourlyTimeline(T0, every_hour(T0, T0 + timedelta(days=7), [])))
    assert chart["bars"] == chart["dots"] == [] and len(chart["ticks"]) == 7
    assert [level["label"] for level in chart["levels"]] == [0, 1]


def test_the_retry_button_reads_as_the_spec_says():
    assert retry_label(1, 4) == "Retry (1/4)"
    assert spent_label(4, 4) == "Max retries reached (4/4) · Permanent failure"


def test_times_are_shown_in_utc():
    assert shown_time("2026-05-04T13:00:12.5+00:00") == "2026-05-04 13:00:12 UTC"
    assert shown_time(None) == "—"
