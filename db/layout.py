"""How an operator maps a scraper's runs table onto stuck-runs' roles and states (SPEC §11).

`COLUMN_MAP` names the columns that play stuck-runs' roles, `STATUS_MAP` the values that mean its
states, `RUN_LABEL` how a run is named. Parsed here, pure, into one `Layout`; `db.table` resolves
it against the reflected table, and every statement is rendered from that. Nothing else knows a
real column's or a status value's name.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass, field

from db.errors import ConfigError

ROLES = ("id", "status", "started_at", "completed_at", "error_message")
# Roles a table may lack: `updated_at`, the bookkeeping time stuck-runs sets to now() on every write
# (without a mapping, a column spelled like one is found by db.table); and SPEC §14's `kind` (what
# sort of run a row is), `max_runtime` (the run's own limit) and `progress` (a counter the scraper
# raises), and §16's `priority`, only when mapped.
OPTIONAL_ROLES = ("updated_at", "kind", "max_runtime", "progress", "priority")
LIMIT_ROLES = ("kind", "max_runtime", "progress")
# SPEC §16: a number the scraper writes; more retries due than free slots go highest first.
# The states stuck-runs reads and writes; `queued` is the scraper's own waiting value (§12's hand-off).
STATES = ("running", "completed", "failed", "pending_retry", "cancelled", "queued")
WRITTEN_STATES = ("running", "completed", "failed", "pending_retry", "cancelled")
# The columns stuck-runs adds and keeps: no role may be one of them.
RETRY_COLUMNS = (
    "retry_count",
    "max_retries",
    "next_retry_at",
    "original_run_id",
    "is_retry",
    "failure_pattern",
    "handed_off",  # how a retry left for the fleet (SPEC §12): webhook or queue; NULL when run here
    "delivering_until",  # the lease of a delivery in flight (SPEC §12's hand-over); NULL otherwise
    "delivering_by",  # which process (and delivery) holds that lease
    "postponements",  # how often the fleet could not take this retry: its backoff doubles on it
)
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_$]*")
NAME_MAX_LENGTH = 63
VALUE_MAX_LENGTH = 63


def _shown(text: str) -> str:
    return repr(text) if len(text) <= 80 else f"{text[:50]!r}… ({len(text)} characters)"


@dataclass(frozen=True)
class Layout:
    """The configured mapping: role → column name, state → values (the first is written), the label."""

    columns: dict[str, str] = field(default_factory=dict)
    statuses: dict[str, tuple[str, ...]] = field(default_factory=dict)
    label: str | None = None

    def column(self, role: str) -> str:
        return self.columns.get(role, role)

    def values(self, state: str) -> tuple[str, ...]:
        return self.statuses.get(state, (state,))

    def written(self, state: str) -> str:
        return self.values(state)[0]

    def written_states(self) -> tuple[str, ...]:
        """The states whose values stuck-runs writes: `queued` too once STATUS_MAP maps it (the
        hand-off writes it, the sweep compares with it), so the column must take its value."""
        return (*WRITTEN_STATES, "queued") if "queued" in self.statuses else WRITTEN_STATES

    def __hash__(self) -> int:
        return hash((tuple(sorted(self.columns.items())), tuple(sorted(self.statuses.items())), self.label))


def _pairs(text: str, name: str, what: str, example: str) -> list[tuple[str, str]]:
    pairs = []
    for item in str(text).split(","):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key or not value:
            raise ConfigError(f"{name}: {_shown(item.strip())} is not {what}: write it as {example}")
        pairs.append((key, value))
    if not pairs:
        raise ConfigError(f"{name} is empty: write it as {example}, or unset it")
    return pairs


def parse_column_map(text: str, name: str = "COLUMN_MAP") -> dict[str, str]:
    """`id=run_id,completed_at=finished_at`: the columns that play stuck-runs' roles."""
    example = "role=column pairs such as id=run_id,completed_at=finished_at"
    columns: dict[str, str] = {}
    for role, column in _pairs(text, name, "role=column", example):
        if role not in (*ROLES, *OPTIONAL_ROLES):
            raise ConfigError(
                f"{name}: {_shown(role)} is not a role: map some of {', '.join((*ROLES, *OPTIONAL_ROLES))}"
            )
        if role in columns:
            raise ConfigError(f"{name} maps {role} twice: keep one {role}=column")
        if column in RETRY_COLUMNS:
            raise ConfigError(
                f"{name}: {role}={column} is one of stuck-runs' own columns: map a column of the scraper's"
            )
        if not _NAME.fullmatch(column) or len(column) > NAME_MAX_LENGTH:
            raise ConfigError(
                f"{name}: {role}={_shown(column)} is not a column name: use letters, digits and _ "
                f"(at most {NAME_MAX_LENGTH}), as the table spells it"
            )
        columns[role] = column
    taken = {}
    for role in (*ROLES, *(r for r in OPTIONAL_ROLES if r in columns)):
        column = columns.get(role, role)
        if column in taken:
            raise ConfigError(
                f"{name}: column {column} would play both {taken[column]} and {role}: give each role its own column"
            )
        taken[column] = role
    return columns


def parse_status_map(text: str, name: str = "STATUS_MAP") -> dict[str, tuple[str, ...]]:
    """`completed=success,running=running|indexing`: the values that mean each state; the first is written."""
    example = "state=value pairs such as completed=done,running=running|indexing"
    statuses: dict[str, tuple[str, ...]] = {}
    for state, text_values in _pairs(text, name, "state=value", example):
        if state not in STATES:
            raise ConfigError(f"{name}: {_shown(state)} is not a state: map some of {', '.join(STATES)}")
        if state in statuses:
            raise ConfigError(f"{name} maps {state} twice: list its values once, as {state}=a|b")
        values = tuple(v.strip() for v in text_values.split("|"))
        if not all(values) or len(set(values)) != len(values):
            raise ConfigError(f"{name}: {state}={_shown(text_values)} has an empty or repeated value: write a|b")
        for value in values:
            if len(value) > VALUE_MAX_LENGTH or not value.isprintable():
                raise ConfigError(
                    f"{name}: {state}={_shown(value)} is not accepted: a status value is printable text of at most "
                    f"{VALUE_MAX_LENGTH} characters"
                )
        statuses[state] = values
    owner: dict[str, str] = {}
    for state in STATES:
        for value in statuses.get(state, (state,)):
            if value in owner:
                raise ConfigError(
                    f"{name}: {value!r} would mean both {owner[value]} and {state}: give each state its own value"
                )
            owner[value] = state
    return statuses


def parse_run_label(text: str, name: str = "RUN_LABEL") -> str:
    """`{keyword} on {site}`: literal text and `{column}` placeholders."""
    template = str(text).strip()
    try:
        parsed = [(f, spec, conv) for _, f, spec, conv in string.Formatter().parse(template) if f is not None]
    except ValueError as exc:
        raise ConfigError(
            f"{name}={_shown(template)} is not a template ({exc}): write {{{{ for a literal brace"
        ) from None
    if any(spec or conv for _, spec, conv in parsed):
        raise ConfigError(f"{name}={_shown(template)}: write plain {{column}} placeholders, without ! or :")
    fields = [f for f, _, _ in parsed]
    if not fields:
        raise ConfigError(f"{name}={_shown(template)} names no column: write {{column}} placeholders, e.g. {{keyword}}")
    for item in fields:
        if not _NAME.fullmatch(item):
            raise ConfigError(f"{name}: {{{item}}} is not a column placeholder: write {{column}}, e.g. {{keyword}}")
    return template


def label_fields(template: str) -> list[tuple[str, str | None]]:
    """The template as (literal, column or None) pieces, in order."""
    return [(literal, column) for literal, column, _, _ in string.Formatter().parse(template)]
