"""Configuration: every bad value is one line naming the variable, the value and the fix."""

from __future__ import annotations

import dataclasses
import re
from datetime import timedelta

import pytest

from db.errors import ConfigError
from db.layout import Layout
from jobs.doctor import run_checks
from jobs.limits import Limits, execution_timeout, limit_for
from jobs.rules import RetryPolicy
from jobs.settings import DECLARED, Settings, load_settings, parse_duration
from jobs.settings.readme import README, with_table
from scheduler.cli import config_options


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


def test_every_setting_is_declared_once():
    for attribute in ("env", "flag", "field"):
        values = [getattr(setting, attribute) for setting in DECLARED]
        assert len(values) == len(set(values)), attribute


def test_the_settings_fields_are_the_declared_ones_and_nothing_else():
    declared = {setting.field for setting in DECLARED}
    top = {field.name for field in dataclasses.fields(Settings)} - {"policy", "layout", "dotenv"}
    assert top == {field for field in declared if "." not in field}
    for within, kind in (("policy", RetryPolicy), ("layout", Layout)):
        assert {f"{within}.{field.name}" for field in dataclasses.fields(kind)} == {
            field for field in declared if field.startswith(f"{within}.")
        }


@pytest.mark.parametrize("setting", DECLARED, ids=lambda setting: setting.env)
def test_an_unset_setting_holds_its_declared_default_and_writing_the_default_changes_nothing(setting):
    unset = load_settings({})
    assert setting.of(unset) == setting.of(Settings()) == setting.value
    if setting.default is not None:  # as --help and the README show it, given back
        assert load_settings({setting.env: setting.default}) == unset


def test_the_retry_policys_own_defaults_are_the_declared_ones():
    """jobs.rules.RetryPolicy() is built bare by the rules' tests: its defaults must not drift."""
    assert RetryPolicy() == load_settings({}).policy


def test_a_secret_has_no_flag_and_no_value_in_the_settings_repr():
    settings = load_settings({"ADMIN_TOKEN": "a" * 16, "READ_TOKEN": "b" * 16})
    assert "a" * 16 not in repr(settings) and "b" * 16 not in repr(settings)
    with pytest.raises(ValueError, match="ADMIN_TOKEN: from the environment only"):
        config_options("ADMIN_TOKEN")


def test_doctors_configuration_line_lists_the_declared_settings_values():
    settings = load_settings({"STUCK_AFTER": "2h", "MAX_RETRIES": "7", "SCRAPE_RUNS_TABLE": "crawl.jobs"})
    [configuration, *_] = run_checks(lambda: settings, lambda: None)
    assert configuration.detail == "stuck after 2:00:00, retry after 4:00:00, 7 retries, table crawl.jobs"


def test_the_readmes_configuration_table_is_the_declarations():
    readme = README.read_text(encoding="utf-8")
    assert with_table(readme) == readme, "README.md's settings table is stale: run `python -m jobs.settings.readme`"
    for setting in DECLARED:
        assert f"| `{setting.env}` |" in readme


def test_execution_timeout_follows_the_runs_own_limit_unless_set():
    settings = load_settings({"STUCK_AFTER": "2h", "STUCK_AFTER_BY_KIND": "sitemap=6h"})
    limits = Limits.from_settings(settings)
    assert execution_timeout(settings, limit_for(limits)) == timedelta(hours=2)
    assert execution_timeout(settings, limit_for(limits, "sitemap")) == timedelta(hours=6)
    assert execution_timeout(settings, limit_for(limits, "sitemap", timedelta(hours=9))) == timedelta(hours=9)
    fixed = load_settings({"STUCK_AFTER": "2h", "STUCK_AFTER_BY_KIND": "sitemap=6h", "EXECUTION_TIMEOUT": "30m"})
    assert execution_timeout(fixed, limit_for(limits, "sitemap")) == timedelta(minutes=30)


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
        ({"SCRAPE_RUN_COMMAND": "scrape {}"}, ["SCRAPE_RUN_COMMAND", "{}", "{run_id}", "{column}"]),
        ({"SCRAPE_RUN_COMMAND": "scrape {a.b}"}, ["SCRAPE_RUN_COMMAND", "{a.b}", "{run_id}"]),
        ({"COLUMN_MAP": "identifier=run_id"}, ["COLUMN_MAP", "'identifier' is not a role", "error_message"]),
        ({"COLUMN_MAP": "id"}, ["COLUMN_MAP", "role=column"]),
        ({"COLUMN_MAP": "id=run id"}, ["COLUMN_MAP", "id='run id'", "column name"]),
        ({"COLUMN_MAP": "status=id"}, ["COLUMN_MAP", "column id would play both id and status"]),
        ({"COLUMN_MAP": " , "}, ["COLUMN_MAP is empty"]),
        ({"STATUS_MAP": "done=success"}, ["STATUS_MAP", "'done' is not a state", "pending_retry"]),
        ({"STATUS_MAP": "completed=failed"}, ["STATUS_MAP", "'failed' would mean both completed and failed"]),
        ({"STATUS_MAP": "running=running||indexing"}, ["STATUS_MAP", "empty or repeated"]),
        ({"RUN_LABEL": "no placeholder"}, ["RUN_LABEL", "names no column"]),
        ({"RUN_LABEL": "{keyword!r}"}, ["RUN_LABEL", "plain {column}"]),
        ({"RUN_LABEL": "{key word}"}, ["RUN_LABEL", "not a column placeholder"]),
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


@pytest.mark.parametrize("text", ["3650d", "87600h", "315360000"])
def test_durations_up_to_ten_years_are_accepted(text):
    assert parse_duration(text, "STUCK_AFTER") == timedelta(days=3650)


@pytest.mark.parametrize("text", ["3651d", "99999999999d", "999999999d", "9" * 400, "9" * 10_000 + "d"])
def test_a_duration_that_would_overflow_a_date_is_refused_with_the_bound(text):
    with pytest.raises(ConfigError) as raised:
        parse_duration(text, "STUCK_AFTER")
    message = str(raised.value)
    assert message.startswith("STUCK_AFTER=") and "at most 3650d" in message
    assert len(message) < 200  # an enormous value is cut, not repeated


@pytest.mark.parametrize("text", ["nan", "inf", "1e400", "-1h", "", "   ", "1h30m", "٣h"])
def test_durations_that_are_not_plain_numbers_with_a_unit_are_refused(text):
    with pytest.raises(ConfigError, match="is not a duration"):
        parse_duration(text, "--since")


@pytest.mark.parametrize(
    ("env", "fragment"),
    [
        ({"SCRAPE_RUNS_TABLE": "scrape_runs\n"}, None),  # stripped: accepted
        ({"SCRAPE_RUNS_TABLE": "a\n.b"}, "SCRAPE_RUNS_TABLE='a\\n.b' is not accepted"),
        ({"HEARTBEAT_COLUMN": "updated_at\nx"}, "HEARTBEAT_COLUMN="),
        ({"SCRAPE_RUNS_TABLE": "x" * 64}, "at most 63 characters"),
        ({"SCRAPE_RUN_CALLABLE": "scraper\n:run"}, "package.module:function"),
    ],
)
def test_names_are_checked_whole_and_against_postgresql_limits(env, fragment):
    if fragment is None:
        assert load_settings(env).table == "scrape_runs"
        return
    with pytest.raises(ConfigError) as raised:
        load_settings(env)
    assert fragment in str(raised.value) and "\n" not in str(raised.value)


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        (
            "postgresql://u:Zq9x@localhost:abc/db",
            "DATABASE_URL: port 'abc' is not accepted: use a number from 1 to 65535",
        ),
        ("postgresql://u:Zq9x@localhost:99999/db", "port '99999'"),
        ("postgresql://u:Zq9x@Wv8y@db.internal/db", "write an '@' in the password as %40"),
        ("postgresql://u:Zq9x@Wv8y:Zq9x@db.internal:5432/db", "write an '@' in the password as %40"),
        ("postgresql://u:Zq9x%00Wv8y@db.internal/db", "NUL byte (%00)"),
        ("postgresql://db.internal/db?Zq9x%40Wv8y=1", "query parameter"),
        ("mysql://u:Zq9x@db.internal/db?password=Wv8y", "not a PostgreSQL URL"),
        ("not a url Zq9x Wv8y", "is not a database URL"),
    ],
)
def test_a_bad_database_url_is_one_line_without_any_of_the_password(url, fragment):
    with pytest.raises(ConfigError) as raised:
        load_settings({"DATABASE_URL": url})
    message = str(raised.value)
    assert fragment in message
    assert "Zq9x" not in message and "Wv8y" not in message


@pytest.mark.parametrize(
    ("url", "normalised"),
    [
        ("postgres://u:p@h/db", "postgresql+psycopg2://u:p@h/db"),
        ("postgresql://u:p%40ss@h:5432/db", "postgresql+psycopg2://u:p%40ss@h:5432/db"),
        ("postgresql://user@server:pw@h/db", "postgresql+psycopg2://user%40server:pw@h/db"),  # Azure's user names
        (
            "postgresql:///db?host=/run/pg&user=u&password=pw",
            "postgresql+psycopg2:///db?host=%2Frun%2Fpg&password=pw&user=u",
        ),
    ],
)
def test_database_urls_postgresql_accepts_are_accepted(url, normalised):
    assert load_settings({"DATABASE_URL": url}).database_url == normalised


def test_no_setting_error_repeats_the_database_password():
    env = {
        "DATABASE_URL": "postgresql://scraper:Hunter2-pw@db.internal/runs?sslpassword=K3y-pass",
        "SCRAPE_RUN_COMMAND": "scrape --db postgresql://scraper:Hunter2-pw@db.internal/runs --key K3y-pass 'unclosed",
    }
    with pytest.raises(ConfigError) as raised:
        load_settings(env)
    message = str(raised.value)
    assert "SCRAPE_RUN_COMMAND=" in message and "quotes" in message
    assert "Hunter2-pw" not in message and "K3y-pass" not in message


@pytest.mark.parametrize("name", ["STUCK_AFTER", "SCRAPE_RUN_COMMAND", "FAILURE_PATTERNS_FILE", "DATABASE_URL"])
@pytest.mark.parametrize(("value", "fragment"), [("1h\x00", "holds a NUL byte"), ("1h\udcff", "is not UTF-8 text")])
def test_nul_bytes_and_undecodable_bytes_are_refused_for_every_setting(name, value, fragment):
    with pytest.raises(ConfigError) as raised:
        load_settings({}, {name: value})
    assert fragment in str(raised.value)


def test_an_enormous_value_is_named_but_cut():
    with pytest.raises(ConfigError) as raised:
        load_settings({"RETRY_BACKOFF": "x" * 10_000})
    message = str(raised.value)
    assert message.startswith("RETRY_BACKOFF='xxxx") and "(10000 characters)" in message and len(message) < 200


def test_a_bad_permanent_entry_in_the_patterns_file_blames_the_file(tmp_path):
    path = tmp_path / "patterns.json"
    path.write_text('{"patterns": {"captcha": "captcha"}, "permanent": ["captcha", "nope"]}')
    for flags, name in (
        ({}, "FAILURE_PATTERNS_FILE"),
        ({"FAILURE_PATTERNS_FILE": str(path)}, "--failure-patterns-file"),
    ):
        with pytest.raises(ConfigError) as raised:
            load_settings({"FAILURE_PATTERNS_FILE": str(path)}, flags)
        message = str(raised.value)
        assert message.startswith(f"{name}={str(path)!r}") and "'nope'" in message
        assert "PERMANENT_PATTERNS" not in message
    with pytest.raises(ConfigError, match="^--permanent-patterns: unknown failure pattern 'nope'"):
        load_settings({}, {"PERMANENT_PATTERNS": "nope"})


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (b"\xff\xfe{}", "is not UTF-8 text (byte 0xff at offset 0): save it as UTF-8"),
        (b'{"patterns": {"caf\xe9": "x"}}', "is not UTF-8 text (byte 0xe9 at offset 18)"),
        (b"[1, 2]", "expected {"),
        (b'"patterns"', "expected {"),
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
        (b'{"patterns": {"x": "a{99999999999}"}}', "expression of 'x' is invalid"),
        (b'{"patterns": {"x": "' + b"(" * 2000 + b")" * 2000 + b'"}}', "expression of 'x' is invalid"),
        (b'{"patterns": {"bad\\nname": "x"}}', "pattern name 'bad\\nname'"),
        (b" " * 1_000_001, "larger than 1 MB"),
    ],
)
def test_a_patterns_file_that_is_not_what_it_should_be_is_one_line(tmp_path, content, fragment):
    path = tmp_path / "patterns.json"
    path.write_bytes(content)
    with pytest.raises(ConfigError) as raised:
        load_settings({"FAILURE_PATTERNS_FILE": str(path)})
    message = str(raised.value)
    assert message.startswith(f"FAILURE_PATTERNS_FILE={str(path)!r}") and fragment in message
    assert "\n" not in message and len(message) < 300


def test_a_patterns_file_that_is_a_directory_cannot_be_read(tmp_path):
    with pytest.raises(ConfigError, match="cannot be read: Is a directory"):
        load_settings({"FAILURE_PATTERNS_FILE": str(tmp_path)})


def test_a_patterns_file_saved_with_a_byte_order_mark_is_read(tmp_path):
    path = tmp_path / "patterns.json"
    path.write_bytes(b'\xef\xbb\xbf{"patterns": {"captcha": "captcha"}}')
    assert load_settings({"FAILURE_PATTERNS_FILE": str(path)}).failure_patterns == (("captcha", "captcha"),)
