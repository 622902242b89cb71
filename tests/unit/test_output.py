"""How the CLI prints: tables that fit the terminal without cutting ids, one date format."""

from __future__ import annotations

import io
import json
import sys
import uuid
from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from scheduler.cli.output import clip, fit_widths, render_table, terminal_width, when
from scheduler.documents import plain

RUN_ID = str(uuid.UUID("3f1c2a7e-8d1b-4c55-9a57-2b0f5c1d9e11"))


def test_nothing_shrinks_when_it_fits_or_when_there_is_no_terminal():
    assert fit_widths([10, 20], [10, 5], 80) == [10, 20]
    assert fit_widths([10, 200], [10, 5], None) == [10, 200]


def test_the_widest_shrinkable_column_shrinks_first_then_they_shrink_together():
    # 10 + 2 + 50 + 2 + 30 = 94 for 80: the 50 loses 14 first.
    assert fit_widths([10, 50, 30], [10, 12, 12], 80) == [10, 36, 30]
    # 10 + 2 + 40 + 2 + 40 = 94 for 60: both lose alike.
    assert fit_widths([10, 40, 40], [10, 12, 12], 60) == [10, 23, 23]


def test_a_column_at_its_minimum_is_never_cut_further():
    assert fit_widths([36, 40], [36, 12], 20) == [36, 12]


@given(
    st.lists(st.tuples(st.integers(1, 120), st.integers(0, 120), st.booleans()), min_size=1, max_size=9),
    st.integers(10, 300),
)
def test_widths_stay_between_minimum_and_natural_and_fit_when_they_can(columns, available):
    natural = [n for n, _, _ in columns]
    minimum = [min(n, m) if free else n for n, m, free in columns]
    widths = fit_widths(natural, minimum, available)
    assert all(lo <= w <= hi for w, lo, hi in zip(widths, minimum, natural, strict=True))
    gaps = 2 * (len(widths) - 1)
    if sum(minimum) + gaps <= available:
        assert sum(widths) + gaps <= available
        if sum(natural) + gaps > available:
            assert sum(widths) + gaps == available  # no width given away
    else:
        assert widths == minimum


def test_clip_drops_a_word_whole_rather_than_cutting_it():
    assert clip("short", 10) == "short"
    assert clip("superseded=0, executed=12, completed=0", 30) == "superseded=0, executed=12…"
    assert clip("HTTP 503 Service Unavailable", 12) == "HTTP 503…"
    assert clip("abcdefghijklmnop", 8) == "abcdefg…"  # no space near: a plain cut
    assert len(clip("x" * 100, 12)) == 12


def test_a_table_that_fits_cuts_only_free_text_and_keeps_ids_whole():
    rows = [(RUN_ID, "Senior Principal Data Platform Architect in Brussels", "HTTP 503 " * 12)]
    lines = render_table(("RUN ID", "RUN", "ERROR MESSAGE"), rows, ("RUN", "ERROR MESSAGE"), 100)
    assert max(map(len, lines)) <= 100
    assert lines[1].startswith(RUN_ID + "  ")
    assert "…" in lines[1]
    assert lines[0].split() == ["RUN", "ID", "RUN", "ERROR", "MESSAGE"]


def test_without_a_width_every_character_is_printed():
    message = "HTTP 503 " * 30
    lines = render_table(("RUN ID", "ERROR MESSAGE"), [(RUN_ID, message)], ("ERROR MESSAGE",), None)
    assert message.strip() in lines[1]


def test_a_table_whose_fixed_columns_cannot_fit_is_printed_as_blocks():
    headers = ("#", "RUN ID", "STATUS", "STARTED", "COMPLETED", "ERROR MESSAGE")
    started = when(datetime(2026, 11, 23, 21, 59, tzinfo=timezone.utc))
    rows = [(0, RUN_ID, "failed", started, started, "boom " * 40), (1, RUN_ID, "pending_retry", "-", "-", "-")]
    lines = render_table(headers, rows, ("ERROR MESSAGE",), 80)
    assert max(map(len, lines)) <= 80
    assert lines[0].startswith("-[ 1 ]") and f"RUN ID         {RUN_ID}" in lines
    assert "STARTED        2026-11-23 21:59 UTC" in lines and "-[ 2 ]" in lines[7]


def test_a_cell_that_spans_lines_stays_on_one():
    lines = render_table(("ERROR",), [("Traceback:\n  boom",)], ("ERROR",), None)
    assert lines == ["ERROR", "Traceback:   boom"]


def test_no_rows_no_lines():
    assert render_table(("A",), [], (), 80) == []


def test_columns_is_honoured_and_a_pipe_gets_full_width(monkeypatch):
    monkeypatch.setenv("COLUMNS", "77")
    assert terminal_width() == 77
    monkeypatch.delenv("COLUMNS")
    monkeypatch.setattr(sys, "stdout", io.StringIO())
    assert terminal_width() is None


@pytest.mark.parametrize(
    "value",
    [
        datetime(2026, 11, 23, 21, 59, 30, tzinfo=timezone.utc),
        datetime(2026, 11, 23, 21, 59, 30),  # naive: UTC by contract
        datetime(2026, 11, 23, 22, 59, 30, tzinfo=timezone(timedelta(hours=1))),
    ],
)
def test_one_date_format_for_people_and_iso_8601_with_offset_for_scripts(value):
    assert when(value) == "2026-11-23 21:59 UTC"
    assert json.dumps(plain({"at": value})) == '{"at": "2026-11-23T21:59:30+00:00"}'
    assert when(None) == "-"
