"""Configuration: every bad value is one line naming the variable, the value and the fix."""

from __future__ import annotations

import re
from datetime import timedelta

import pytest

from jobs.config import load_settings, parse_duration
from jobs.errors import ConfigError


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("90s", timedelta(seconds=90)),
        ("30m", timedelta(minutes=30)),
        ("1h", timedelta(hours=1)),
        ("4h", timedelta(hours=4)),
        ("1d", timedelta(days=1)),
        ("3600", timedelta(hours=1)),
        (" 2H ", timedelta(hours=2)),
    ],
)
def test_durations(text, expected):
    assert parse_duration(text, "STUCK_AFTER") == expected


def test_defaults():
    settings = load_settings({})
    policy = settings.policy
    assert (policy.stuck_after, policy.retry_delay, policy.max_retries) == (timedelta(hours=1), timedelta(hours=4), 4)
    assert (settings.check_interval, settings.process_interval) == (timedelta(hours=1), timedelta(minutes=30))
    assert settings.timeout == timedelta(hours=1)
    assert (settings.max_concurrent_retries, settings.batch_size, settings.table) == (1, 1000, "scrape_runs")
    assert policy.permanent_patterns == {"not_found", "forbidden"}


def test_execution_timeout_follows_the_stuck_threshold_unless_set():
    assert load_settings({"STUCK_AFTER": "2h"}).timeout == timedelta(hours=2)
    assert load_settings({"STUCK_AFTER": "2h", "EXECUTION_TIMEOUT": "30m"}).timeout == timedelta(minutes=30)


@pytest.mark.parametrize(
    ("env", "fragments"),
    [
        ({"STUCK_AFTER": "soon"}, ["STUCK_AFTER='soon'", "90s, 30m, 1h"]),
        ({"STUCK_AFTER": "0"}, ["STUCK_AFTER='0'", "longer than zero"]),
        ({"RETRY_DELAY": "4 hours"}, ["RETRY_DELAY='4 hours'"]),
        ({"MAX_RETRIES": "-1"}, ["MAX_RETRIES='-1'", "whole number"]),
        ({"MAX_RETRIES": "four"}, ["MAX_RETRIES='four'"]),
        ({"BATCH_SIZE": "0"}, ["BATCH_SIZE='0'"]),
        ({"MAX_CONCURRENT_RETRIES": "0"}, ["MAX_CONCURRENT_RETRIES='0'"]),
        ({"RETRY_BACKOFF": "linear"}, ["RETRY_BACKOFF='linear'", "fixed, exponential"]),
        ({"RETRY_JITTER": "2"}, ["RETRY_JITTER='2'", "fraction"]),
        ({"LOG_FORMAT": "xml"}, ["LOG_FORMAT='xml'", "text, json"]),
        ({"HEARTBEAT_COLUMN": "updated at"}, ["HEARTBEAT_COLUMN='updated at'"]),
        ({"SCRAPE_RUNS_TABLE": "runs; drop table x"}, ["SCRAPE_RUNS_TABLE="]),
        ({"METRICS_PORT": "99999"}, ["METRICS_PORT='99999'"]),
        ({"SCRAPE_RUN_COMMAND": "scrape {query}"}, ["SCRAPE_RUN_COMMAND", "{query}", "{run_id}"]),
        ({"SCRAPE_RUN_COMMAND": "scrape 'unclosed"}, ["SCRAPE_RUN_COMMAND", "quotes"]),
        ({"SCRAPE_RUN_CALLABLE": "scraper.run"}, ["SCRAPE_RUN_CALLABLE", "package.module:function"]),
        ({"SCRAPE_RUN_COMMAND": "scrape", "SCRAPE_RUN_CALLABLE": "a:b"}, ["both set"]),
        ({"DATABASE_URL": "mysql://u:pw@h/db"}, ["DATABASE_URL", "PostgreSQL"]),
        ({"RETRY_BACKOFF": "exponential", "RETRY_DELAY": "2d", "RETRY_MAX_DELAY": "1d"}, ["RETRY_MAX_DELAY"]),
    ],
)
def test_bad_values_are_named_in_one_line(env, fragments):
    with pytest.raises(ConfigError) as raised:
        load_settings(env)
    message = str(raised.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message


def test_the_password_never_appears_in_a_config_error():
    with pytest.raises(ConfigError) as raised:
        load_settings({"DATABASE_URL": "mysql://scraper:s3cret-pw@db.internal/runs"})
    assert "s3cret-pw" not in str(raised.value)


def test_flags_override_the_environment_and_name_themselves():
    settings = load_settings({"STUCK_AFTER": "2h", "MAX_RETRIES": "9"}, {"STUCK_AFTER": "30m"})
    assert settings.policy.stuck_after == timedelta(minutes=30)
    assert settings.policy.max_retries == 9
    with pytest.raises(ConfigError, match="--stuck-after='x'"):
        load_settings({}, {"STUCK_AFTER": "x"})


def test_command_templates_split_without_a_shell():
    settings = load_settings({"SCRAPE_RUN_COMMAND": "python -m scraper --query '{search_query}' --run-id={run_id}"})
    assert settings.command == ("python", "-m", "scraper", "--query", "{search_query}", "--run-id={run_id}")


def test_database_url_is_normalised_to_psycopg2():
    assert load_settings({"DATABASE_URL": "postgresql://u:p@h/db"}).database_url == "postgresql+psycopg2://u:p@h/db"
    with pytest.raises(ConfigError, match="DATABASE_URL is not set"):
        load_settings({}).require_database_url()


def test_a_patterns_file_adds_patterns_and_can_make_them_permanent(tmp_path):
    path = tmp_path / "patterns.json"
    path.write_text('{"patterns": {"captcha": "captcha|are you a robot"}, "permanent": ["not_found", "captcha"]}')
    settings = load_settings({"FAILURE_PATTERNS_FILE": str(path)})
    assert settings.failure_patterns == (("captcha", "captcha|are you a robot"),)
    assert settings.policy.permanent_patterns == {"not_found", "captcha"}
    # The environment still wins over the file.
    assert load_settings(
        {"FAILURE_PATTERNS_FILE": str(path), "PERMANENT_PATTERNS": "captcha"}
    ).policy.permanent_patterns == {"captcha"}


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ("{not json", "is not valid JSON"),
        ('{"patterns": {"x": "("}}', "expression of 'x' is invalid"),
        ('{"patterns": {"x": "a"}, "colour": 1}', "expected"),
        ('{"permanent": "not_found"}', "must be a list"),
        ('{"permanent": ["nope"]}', "unknown failure pattern 'nope'"),
    ],
)
def test_a_bad_patterns_file_is_named_with_the_problem(tmp_path, content, fragment):
    path = tmp_path / "patterns.json"
    path.write_text(content)
    with pytest.raises(ConfigError, match=re.escape(fragment)):
        load_settings({"FAILURE_PATTERNS_FILE": str(path)})
    with pytest.raises(ConfigError, match="cannot be read"):
        load_settings({"FAILURE_PATTERNS_FILE": str(tmp_path / "missing.json")})
