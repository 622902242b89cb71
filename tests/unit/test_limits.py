"""SPEC §14's precedence for one run, and how a learned limit is rounded."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from jobs.limits import AppliedLimit, LearnedLimit, Limits, learned_limit, limit_for, stall_limit
from jobs.settings.declarations import settings_from

NOW = datetime(2026, 12, 6, tzinfo=timezone.utc)
LIMITS = Limits(
    default=timedelta(hours=1),
    configured={"jobs_de": timedelta(minutes=15)},
    learned={
        "jobs_de": LearnedLimit(timedelta(minutes=20), 412, NOW),
        "sitemap": LearnedLimit(timedelta(hours=7), 40, NOW),
    },
)


@pytest.mark.parametrize(
    ("kind", "max_runtime", "expected"),
    [
        ("jobs_de", timedelta(minutes=5), AppliedLimit(timedelta(minutes=5), "run", "jobs_de")),
        ("jobs_de", None, AppliedLimit(timedelta(minutes=15), "configured", "jobs_de")),
        ("sitemap", None, AppliedLimit(timedelta(hours=7), "learned", "sitemap", 40)),
        ("other", None, AppliedLimit(timedelta(hours=1), "default", "other")),
        (None, None, AppliedLimit(timedelta(hours=1), "default", None)),
        (None, timedelta(hours=9), AppliedLimit(timedelta(hours=9), "run", None)),
    ],
)
def test_precedence_run_then_configured_then_learned_then_default(kind, max_runtime, expected) -> None:
    assert limit_for(LIMITS, kind, max_runtime) == expected


def test_reasons_name_the_source() -> None:
    assert limit_for(LIMITS, "sitemap").reason("spider") == "limit 7.0h, learned for spider=sitemap from 40 runs"
    assert limit_for(LIMITS, "jobs_de").reason("spider") == "limit 0.3h, configured for spider=jobs_de"
    assert limit_for(LIMITS, "x", timedelta(minutes=18)).reason() == "limit 0.3h, the run's own max_runtime"
    assert limit_for(LIMITS, "x").reason() == "limit 1.0h, the default (STUCK_AFTER)"


def test_learned_limits_count_only_when_learning_is_on() -> None:
    learned = {"sitemap": LearnedLimit(timedelta(hours=7), 40, NOW)}
    off = Limits.from_settings(settings_from({}), learned)
    on = Limits.from_settings(settings_from({"learn_thresholds": True}), learned)
    assert limit_for(off, "sitemap").source == "default"
    assert limit_for(on, "sitemap").source == "learned"


def test_stall_limit_defaults_to_the_runs_own_limit() -> None:
    applied = limit_for(LIMITS, "jobs_de")
    assert stall_limit(LIMITS, applied) == timedelta(minutes=15)
    assert stall_limit(Limits(timedelta(hours=1), stall_after=timedelta(minutes=3)), applied) == timedelta(minutes=3)


@pytest.mark.parametrize(
    ("p99", "margin", "floor", "expected"),
    [
        (timedelta(minutes=7, seconds=1), 2, timedelta(minutes=10), timedelta(minutes=15)),  # 14m02s up to 15m
        (timedelta(minutes=7), 2, timedelta(minutes=10), timedelta(minutes=14)),  # exactly 14m stays
        (timedelta(minutes=2), 2, timedelta(minutes=10), timedelta(minutes=10)),  # the floor
        (timedelta(hours=5, minutes=30), 1.5, timedelta(minutes=10), timedelta(hours=8, minutes=15)),
    ],
)
def test_learned_limit_is_p99_times_margin_rounded_up_to_a_minute(p99, margin, floor, expected) -> None:
    assert learned_limit(p99, margin, floor) == expected
