"""`stuck-runs thresholds`, `GET /api/thresholds` and the stats page's limits (SPEC §14): per kind,
its completed runs in the window and their runtimes (p50 / p95 / p99 / longest), the limit in force
and where it comes from, the runs running now; and the evidence an operator chooses a limit by —
completed runs that ran longer than the limit (each would have been failed while healthy) and runs
failed as stuck, with how long past the limit they had run when caught.

`--what-if` shows the same for proposed values (kind=duration pairs, `stuck-after`, `learn`,
`learn-window`, `learn-min-runs`, `learn-margin`, `learn-floor`) beside the limits in force now,
and changes nothing: it writes no row, not even the stored learned limits.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta

from db.engine import database_errors
from db.errors import ConfigError, UsageError
from db.queries.thresholds import ThresholdStatements
from jobs import learning
from jobs.learning import Learned, LearnSettings, span
from jobs.limits import Limits, learned_by_kind, learning_rule, limit_for
from jobs.model import as_utc
from jobs.runtime import Runtime
from jobs.settings.parsers import parse_duration, parse_int, parse_margin, parse_switch

WHAT_IF_EXAMPLE = "jobs_de=30m,learn-margin=3"
LEARN_KEYS = ("learn-window", "learn-min-runs", "learn-margin", "learn-floor")


@dataclass(frozen=True)
class Proposal:
    """Proposed values (`--what-if`): limits by kind, the default, and learning's settings."""

    text: str
    kinds: Mapping[str, timedelta] = field(default_factory=dict)
    default: timedelta | None = None  # `stuck-after=2h`
    learn: bool | None = None  # `learn=on|off`; a learn-* key alone means on
    window: timedelta | None = None
    min_runs: int | None = None
    margin: float | None = None
    floor: timedelta | None = None


def parse_what_if(text: str) -> Proposal:
    """`jobs_de=30m,learn-margin=3`: raises `UsageError` (one line, naming the fix) for anything else."""
    values: dict[str, object] = {}
    kinds: dict[str, timedelta] = {}
    try:
        for item in str(text).split(","):
            if not item.strip():
                continue
            key, sep, value = (part.strip() for part in item.partition("="))
            if not sep or not key or not value:
                raise ConfigError(f"{item.strip()!r} is not key=value")
            name = f"--what-if {key}"
            if key in values or key in kinds:
                raise ConfigError(f"{key} is given twice")
            if key == "stuck-after":
                values[key] = parse_duration(value, name)
            elif key == "learn":
                values[key] = parse_switch(value, name)
            elif key in ("learn-window", "learn-floor"):
                values[key] = parse_duration(value, name)
            elif key == "learn-min-runs":
                values[key] = parse_int(value, name, minimum=1, maximum=1_000_000)
            elif key == "learn-margin":
                values[key] = parse_margin(value, name)
            elif key.startswith("learn"):
                raise ConfigError(f"{key} is not a learning setting: use learn, {', '.join(LEARN_KEYS)}")
            else:
                kinds[key] = parse_duration(value, f"--what-if {key}")
    except ConfigError as exc:
        raise UsageError(
            f"--what-if: {str(exc).removeprefix('--what-if ')}; write kind=duration and learning's keys, "
            f"e.g. {WHAT_IF_EXAMPLE}"
        ) from None
    if not values and not kinds:
        raise UsageError(f"--what-if proposes nothing: write kind=duration and learning's keys, e.g. {WHAT_IF_EXAMPLE}")
    learn = values.get("learn")
    if learn is None and any(key in values for key in LEARN_KEYS):
        learn = True
    return Proposal(
        text=str(text),
        kinds=kinds,
        default=values.get("stuck-after"),
        learn=learn,
        window=values.get("learn-window"),
        min_runs=values.get("learn-min-runs"),
        margin=values.get("learn-margin"),
        floor=values.get("learn-floor"),
    )


@dataclass(frozen=True)
class KindThresholds:
    """One kind's runs and its limit; `kind` None: runs of no kind (all runs, without a kind role)."""

    kind: str | None
    runs: int  # completed in the window
    p50: timedelta | None
    p95: timedelta | None
    p99: timedelta | None
    longest: timedelta | None
    limit: timedelta  # for a run without a max_runtime of its own
    source: str  # configured | learned | default (a run's own max_runtime beats each)
    reason: str  # `limit 0.3h, learned for spider=jobs_de from 412 runs`
    not_learned: str | None  # why learning gave this kind no limit, when learning is on
    running: int  # running now
    oldest_running: timedelta | None  # how long the oldest of them has run
    over_limit: int  # completed runs in the window that ran longer than their limit
    caught: int  # runs failed as stuck in the window
    caught_past_median: timedelta | None  # how long past their limit they had run when failed
    caught_past_most: timedelta | None
    limit_now: timedelta | None = None  # with a what-if: the limit in force now, its source, its evidence
    source_now: str | None = None
    over_limit_now: int | None = None


@dataclass(frozen=True)
class Thresholds:
    since: datetime  # completed runs from then on
    window: timedelta
    learning: bool
    learned_at: datetime | None  # when the runtimes were computed (None: just now, not stored)
    learned_with: str  # window, minimum runs, margin, floor
    default: timedelta  # STUCK_AFTER
    kind_column: str | None  # COLUMN_MAP's kind, None without it
    what_if: str | None  # the proposal shown, None for the limits in force
    kinds: tuple[KindThresholds, ...]


def thresholds(rt: Runtime, proposal: Proposal | None = None) -> Thresholds:
    """Each kind's runtimes, limit and evidence under the limits in force, or, with `proposal`,
    under the proposed values (beside the limits in force), writing nothing."""
    settings = rt.settings
    learn_now = LearnSettings.of(settings)
    if proposal is None:
        if settings.learn_thresholds:  # the limits in force: as every process reads them
            history = learning.learned(rt, learn_now, learning_rule(learn_now))
        else:
            history = learning.history_read_only(rt, learn_now, learning_rule(learn_now))
        limits = _limits(settings, history, settings.learn_thresholds)
        return _assemble(rt, history, limits, _Shown(settings.learn_thresholds, learn_now))
    learn = LearnSettings(
        proposal.window or learn_now.window,
        proposal.min_runs or learn_now.min_runs,
        proposal.margin or learn_now.margin,
        proposal.floor or learn_now.floor,
    )
    learning_on = settings.learn_thresholds if proposal.learn is None else proposal.learn
    history = learning.history_read_only(rt, learn, learning_rule(learn))
    limits = _limits(settings, history, learning_on, proposal)
    if learn.window == learn_now.window:  # the same runtimes, learned by today's settings
        kinds = tuple(learning.learn_limit(k, learn_now, learning_rule(learn_now)) for k in history.kinds)
        now_history = replace(history, kinds=kinds)
    else:
        now_history = learning.history_read_only(rt, learn_now, learning_rule(learn_now))
    limits_now = _limits(settings, now_history, settings.learn_thresholds)
    return _assemble(rt, history, limits, _Shown(learning_on, learn, limits_now, proposal.text))


def _limits(settings: object, history: Learned, learning_on: bool, proposal: Proposal | None = None) -> Limits:
    configured = dict(settings.stuck_after_by_kind)
    default = settings.policy.stuck_after
    if proposal is not None:
        configured.update(proposal.kinds)
        default = proposal.default or default
    learned = learned_by_kind(history.kinds, history.computed_at) if learning_on else {}
    return Limits(default, configured, learned, settings.stall_after)


@dataclass(frozen=True)
class _Shown:
    """What a `Thresholds` shows besides the runtimes: learning on or off, with which settings; with
    a what-if, the limits in force now beside the proposed ones."""

    learning: bool
    learn: LearnSettings
    limits_now: Limits | None = None
    what_if: str | None = None


def _assemble(rt: Runtime, history: Learned, limits: Limits, shown: _Shown) -> Thresholds:
    q = ThresholdStatements(rt.runs)
    limits_now = shown.limits_now
    now = rt.clock.now()
    since = now - history.window
    with database_errors(rt.engine, "reading thresholds"), rt.engine.connect() as conn:
        running = {r["kind"]: r for r in conn.execute(q.running()).mappings()}
        names = sorted(
            {*(k.kind for k in history.kinds), *running, *(limits.configured if rt.runs.kind else ())} - {None}
        )
        kinds: list[str | None] = [*names, None]
        over = _over_limit(conn, q, limits, names, since)
        over_now = _over_limit(conn, q, limits_now, names, since) if limits_now is not None else {}
        caught = {r["kind"]: r for r in conn.execute(q.caught(), _limit_params(limits, names, since)).mappings()}
    rows = []
    for kind in kinds:
        seen = history.by_kind.get(kind) or learning.KindHistory(kind, 0)
        if kind is None and not seen.runs and kind not in running and kind not in caught and rt.runs.kind:
            continue  # no run lacks a kind: no row for them
        applied = limit_for(limits, kind)
        now_applied = limit_for(limits_now, kind) if limits_now is not None else None
        ran = running.get(kind)
        oldest = as_utc(ran["oldest"]) if ran and ran["oldest"] is not None else None
        got = caught.get(kind)
        rows.append(
            KindThresholds(
                kind=kind,
                runs=seen.runs,
                p50=seen.p50,
                p95=seen.p95,
                p99=seen.p99,
                longest=seen.longest,
                limit=applied.limit,
                source=applied.source,
                reason=applied.reason(rt.runs.name_of(rt.runs.kind) if rt.runs.kind else "kind"),
                not_learned=_not_learned(seen, shown) if applied.source != "learned" else None,
                running=ran["running"] if ran else 0,
                oldest_running=now - oldest if oldest else None,
                over_limit=over.get(kind, 0),
                caught=got["caught"] if got else 0,
                caught_past_median=_seconds(got["past_median"]) if got else None,
                caught_past_most=_seconds(got["past_most"]) if got else None,
                limit_now=now_applied.limit if now_applied else None,
                source_now=now_applied.source if now_applied else None,
                over_limit_now=over_now.get(kind, 0) if now_applied else None,
            )
        )
    return Thresholds(
        since=since,
        window=history.window,
        learning=shown.learning,
        learned_at=history.computed_at,
        learned_with=shown.learn.fingerprint,
        default=limits.default,
        kind_column=rt.runs.name_of(rt.runs.kind) if rt.runs.kind else None,
        what_if=shown.what_if,
        kinds=tuple(rows),
    )


def _not_learned(seen: learning.KindHistory, shown: _Shown) -> str | None:
    """Why learning gave a kind no limit, when learning is on: too few runs in the window."""
    if not shown.learning or seen.kind is None or seen.limit is not None:
        return None
    window = span(shown.learn.window)
    return f"not learned: {seen.runs} completed run(s) in {window}, fewer than LEARN_MIN_RUNS={shown.learn.min_runs}"


def _limit_params(limits: Limits, names: list[str], since: datetime) -> dict[str, object]:
    applied = {name: limit_for(limits, name) for name in names}
    own = [name for name, a in applied.items() if a.source != "default"]
    return {
        "sr_kinds": own,
        "sr_secondss": [applied[name].limit.total_seconds() for name in own],
        "sr_default": limits.default.total_seconds(),
        "sr_since": since,
    }


def _over_limit(conn: object, q: ThresholdStatements, limits: Limits, names: list[str], since: datetime) -> dict:
    found = conn.execute(q.over_limit(), _limit_params(limits, names, since)).mappings()
    return {r["kind"]: r["over_limit"] for r in found}


def _seconds(value: float | None) -> timedelta | None:
    return None if value is None else timedelta(seconds=float(value))
