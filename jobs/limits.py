"""Which limit judges a running run (SPEC §14): its own `max_runtime`, its kind's configured
limit, its kind's learned limit, or the default `STUCK_AFTER`, in that order.

The order is decided here, once. `Limits` holds what every process knows (the settings and the
learned limits of `stuck_runs_thresholds`); `limit_for` applies the order to one run, for a
retry executing here, the log line, the pages and the API; db/queries renders the same order
from the same `Limits` into the sweep's SQL, and a test holds the two to the same answers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from jobs import learning
from jobs.events import LimitsInForce
from jobs.learning import KindHistory, LearnSettings
from jobs.rules import format_duration

if TYPE_CHECKING:
    from jobs.model import Run
    from jobs.runtime import Runtime
    from jobs.settings import Settings

SOURCES = ("run", "configured", "learned", "default")  # the order of precedence


@dataclass(frozen=True)
class LearnedLimit:
    """A kind's limit learned from its completed runs (a row of `stuck_runs_thresholds`)."""

    limit: timedelta
    runs: int  # completed runs in the window it was learned from
    computed_at: datetime


@dataclass(frozen=True)
class Limits:
    """Every limit but a run's own: the default, the configured and the learned ones by kind."""

    default: timedelta
    configured: Mapping[str, timedelta] = field(default_factory=dict)
    learned: Mapping[str, LearnedLimit] = field(default_factory=dict)
    stall_after: timedelta | None = None  # None: a run's progress may stand still as long as its limit
    # False for a flat threshold (`reset-stuck`'s timeout_minutes): the default judges every run,
    # a run's own max_runtime and its stalled progress included.
    own: bool = True

    @classmethod
    def flat(cls, threshold: timedelta) -> Limits:
        """One threshold for every run, for one call (SPEC §13's `timeout_minutes`)."""
        return cls(default=threshold, own=False)

    @classmethod
    def from_settings(cls, settings: Settings, learned: Mapping[str, LearnedLimit] | None = None) -> Limits:
        return cls(
            default=settings.policy.stuck_after,
            configured=dict(settings.stuck_after_by_kind),
            learned=dict(learned or {}) if settings.learn_thresholds else {},
            stall_after=settings.stall_after,
        )


@dataclass(frozen=True)
class AppliedLimit:
    """The limit that judges one run, and where it came from."""

    limit: timedelta
    source: str  # one of SOURCES
    kind: str | None = None
    learned_from: int | None = None  # completed runs, for a learned limit

    def reason(self, kind_role: str = "kind") -> str:
        """`limit 0.3h, learned for spider=jobs_de from 412 runs`: said beside the stuck message."""
        shown = f"limit {format_duration(self.limit)}"
        if self.source == "run":
            return f"{shown}, the run's own max_runtime"
        if self.source == "configured":
            return f"{shown}, configured for {kind_role}={self.kind}"
        if self.source == "learned":
            return f"{shown}, learned for {kind_role}={self.kind} from {self.learned_from} runs"
        return f"{shown}, the default (STUCK_AFTER)"


def limit_for(limits: Limits, kind: str | None = None, max_runtime: timedelta | None = None) -> AppliedLimit:
    """SPEC §14's precedence for one run: its own, its kind's configured, its kind's learned, the default."""
    if not limits.own:
        return AppliedLimit(limits.default, "default", kind)
    if max_runtime is not None:
        return AppliedLimit(max_runtime, "run", kind)
    if kind is not None and kind in limits.configured:
        return AppliedLimit(limits.configured[kind], "configured", kind)
    if kind is not None and kind in limits.learned:
        learned = limits.learned[kind]
        return AppliedLimit(learned.limit, "learned", kind, learned.runs)
    return AppliedLimit(limits.default, "default", kind)


def stall_limit(limits: Limits, applied: AppliedLimit) -> timedelta:
    """How long a run's progress may stand still: `STALL_AFTER`, else the run's own limit."""
    return limits.stall_after if limits.stall_after is not None else applied.limit


def learned_limit(p99: timedelta, margin: float, floor: timedelta) -> timedelta:
    """The p99 runtime times the margin, rounded up to a whole minute, never below the floor."""
    minutes = math.ceil(p99.total_seconds() * margin / 60 - 1e-9)
    return max(timedelta(minutes=max(minutes, 0)), floor)


def learned_by_kind(kinds: Iterable[KindHistory], computed_at: datetime | None) -> dict[str, LearnedLimit]:
    """The learned limits of the kinds that have one (enough runs in the window)."""
    return {
        k.kind: LearnedLimit(k.limit, k.runs, computed_at) for k in kinds if k.kind is not None and k.limit is not None
    }


def learning_rule(learn: LearnSettings) -> Callable[[timedelta], timedelta]:
    """`learned_limit` with the margin and floor of `learn`: what a p99 runtime teaches."""
    return lambda p99: learned_limit(p99, learn.margin, learn.floor)


def current_limits(rt: Runtime) -> Limits:
    """The limits in force for this process: the settings, and with LEARN_THRESHOLDS on the learned
    limits of `stuck_runs_thresholds` (recomputed first when older than an hour, or learned with other
    settings, by whichever process needs them first: jobs.learning). Published (`LimitsInForce`)
    for the metrics."""
    settings = rt.settings
    learned: dict[str, LearnedLimit] = {}
    if settings.learn_thresholds:
        learn = LearnSettings.of(settings)
        table = learning.learned(rt, learn, learning_rule(learn))
        learned = learned_by_kind(table.kinds, table.computed_at)
    limits = Limits.from_settings(settings, learned)
    rt.events.publish(LimitsInForce(limits))
    return limits


def judging_params(limits: Limits, now: datetime, runs_table: str, kind_role: str = "kind") -> dict[str, object]:
    """`limits` as the parameters of db/queries/limits.py's SQL (`sr_lim_*`, and `sr_now`): the
    order of kinds' limits decided here by `limit_for`, one entry per kind with a limit of its
    own; SQL adds only the run's own `max_runtime` before them and the default after."""
    kinds = sorted(set(limits.configured) | set(limits.learned)) if limits.own else []
    applied = [limit_for(limits, kind) for kind in kinds]
    zero = f"limit {format_duration(timedelta(0))}"
    seconds = [a.limit.total_seconds() for a in applied]
    stall_reason = None
    if limits.stall_after is not None:
        stall_reason = f"no progress allowed for {format_duration(limits.stall_after)} (STALL_AFTER)"
    return {
        "sr_now": now,
        "sr_lim_table": runs_table,
        "sr_lim_default_s": limits.default.total_seconds(),
        "sr_lim_min_s": min([limits.default.total_seconds(), *seconds]),
        "sr_lim_own": limits.own,
        "sr_lim_kinds": kinds,
        "sr_lim_kind_s": seconds,
        "sr_lim_kind_source": [a.source for a in applied],
        "sr_lim_kind_reason": [a.reason(kind_role) for a in applied],
        "sr_lim_default_reason": limit_for(limits).reason(kind_role),
        "sr_lim_run_reason": AppliedLimit(timedelta(0), "run").reason(kind_role).removeprefix(zero),
        "sr_lim_stall": limits.own,
        "sr_lim_stall_s": limits.stall_after.total_seconds() if limits.stall_after is not None else None,
        "sr_lim_stall_reason": stall_reason,
    }


def runtime_judging_params(rt: Runtime, limits: Limits | None = None, now: datetime | None = None) -> dict[str, object]:
    """`judging_params` for this process's table: what the sweep, its dry run, `status`, the pages
    and the listing bind, so all of them judge a run alike."""
    limits = limits if limits is not None else current_limits(rt)
    runs = rt.runs
    role = runs.name_of(runs.kind) if runs.kind else "kind"
    return judging_params(limits, now if now is not None else rt.clock.now(), runs.canonical_name, role)


def applied_to_run(rt: Runtime, run: Run, limits: Limits | None = None) -> AppliedLimit:
    """The limit that judges `run` (a row read with its inputs): its own `max_runtime` (an interval
    or seconds), its kind's, the default; what a retry executing here is timed and stalled by."""
    runs = rt.runs
    kind = run.inputs.get(runs.name_of(runs.kind)) if runs.kind else None
    own = run.inputs.get(runs.name_of(runs.max_runtime)) if runs.max_runtime else None
    if own is not None and not isinstance(own, timedelta):
        own = timedelta(seconds=float(own))
    return limit_for(limits if limits is not None else current_limits(rt), None if kind is None else str(kind), own)


def execution_timeout(settings: Settings, applied: AppliedLimit) -> timedelta:
    """`EXECUTION_TIMEOUT` when set, else the run's own limit (SPEC §14: not `STUCK_AFTER`)."""
    return settings.execution_timeout or applied.limit


def limit_document(rt: Runtime, run: Run) -> dict[str, object]:
    """The limit that judges `run` now and why, for the API's run detail and the run's page
    (`limit 0.3h, learned for spider=jobs_de from 412 runs`)."""
    limits = current_limits(rt)
    applied = applied_to_run(rt, run, limits)
    runs = rt.runs
    return {
        "seconds": applied.limit.total_seconds(),
        "source": applied.source,
        "reason": applied.reason(runs.name_of(runs.kind) if runs.kind else "kind"),
        "stall_seconds": stall_limit(limits, applied).total_seconds() if runs.progress_counter else None,
    }
