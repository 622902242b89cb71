"""Configuration: read once from the environment (and `.env`), overridden by flags, validated.

Every value is checked before the database is touched; a bad one raises `ConfigError` with one
line naming the variable (or flag), the value and what is accepted. The result is a frozen
`Settings` passed down; nothing below reads `os.environ`.

- declarations: each setting once (variable, flag, parser, default, help) and `Settings` from them
- parsers: text to value, or one line naming the problem
- loading: the one reader of the environment and `.env`, which it never writes
"""

from jobs.settings.declarations import BY_ENV, DECLARED, ENV_VARS, FLAG_FOR, SECRETS, Setting, Settings
from jobs.settings.loading import environment_with_dotenv, load_settings, read_dotenv, settings_from_environment
from jobs.settings.parsers import is_loopback, parse_duration

__all__ = [
    "BY_ENV",
    "DECLARED",
    "ENV_VARS",
    "FLAG_FOR",
    "SECRETS",
    "Setting",
    "Settings",
    "environment_with_dotenv",
    "is_loopback",
    "load_settings",
    "parse_duration",
    "read_dotenv",
    "settings_from_environment",
]
