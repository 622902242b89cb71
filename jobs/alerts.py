"""What a notification says (SPEC §15), as pure rules: the event kinds, what one occurrence of a
kind holds, how occurrences waiting for the next message fold into one, and the message a person
reads on a phone. No I/O here: jobs/alerting.py records, claims and sends.

An occurrence is a plain JSON-able dict (it waits in `stuck_runs_alerts.pending`):
- stuck: {"count", "sweeps", "kinds": {kind: n}, "labels": [first runs]}
- permanent: {"count", "labels", "patterns": {pattern: n}, "errors": [last errors]}
- retry_failure_rate: {"ended", "failed", "target"?, "target_ended"?, "target_failed"?} (the latest wins)
- checker_silent: {"last_finished": iso or None, "silent_for_s"} (the latest wins)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import timedelta
from urllib.parse import urlencode

STUCK = "stuck"
PERMANENT = "permanent"
RETRY_FAILURE_RATE = "retry_failure_rate"
CHECKER_SILENT = "checker_silent"
EVENT_KINDS = (STUCK, PERMANENT, RETRY_FAILURE_RATE, CHECKER_SILENT)
LISTED_RUNS = 10  # runs named in one message; the count covers the rest
LISTED_ERRORS = 3
ERROR_WIDTH = 160  # a last error is cut here: a phone shows two lines of it
RATE_WINDOW = timedelta(hours=1)  # retry_failure_rate counts the retries that ended this recently
SILENT_AFTER_INTERVALS = 2  # checker_silent: no finished check for this many CHECK_INTERVALs


def distinct(items: list[str]) -> list[str]:
    """`items` in order, each once: a hundred runs stuck alike say their error once."""
    return list(dict.fromkeys(items))


def _add_counts(a: Mapping[str, int], b: Mapping[str, int]) -> dict[str, int]:
    return {key: a.get(key, 0) + b.get(key, 0) for key in (*a, *(k for k in b if k not in a))}


def fold(kind: str, waiting: Mapping | None, new: Mapping) -> dict:
    """What waits for the next message of `kind` once `new` happened after `waiting` (None:
    nothing waited): counts add up, the first runs' labels stay first; a rate or a silence is a
    state, and its latest reading is what the message says."""
    if not waiting:
        return dict(new)
    if kind == STUCK:
        return {
            "count": waiting["count"] + new["count"],
            "sweeps": waiting.get("sweeps", 1) + new.get("sweeps", 1),
            "kinds": _add_counts(waiting.get("kinds", {}), new.get("kinds", {})),
            "labels": [*waiting["labels"], *new["labels"]][:LISTED_RUNS],
        }
    if kind == PERMANENT:
        return {
            "count": waiting["count"] + new["count"],
            "labels": [*waiting["labels"], *new["labels"]][:LISTED_RUNS],
            "patterns": _add_counts(waiting.get("patterns", {}), new.get("patterns", {})),
            "errors": distinct([*waiting.get("errors", []), *new.get("errors", [])])[:LISTED_ERRORS],
        }
    return dict(new)


def _plural(count: int, one: str, many: str | None = None) -> str:
    return f"{count} {one if count == 1 else (many or one + 's')}"


def _counts(counts: Mapping[str, int]) -> str:
    return ", ".join(f"{name} {n}" for name, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def _labels(labels: Sequence[str], count: int) -> list[str]:
    lines = [f"• {label}" for label in labels[:LISTED_RUNS]]
    if count > len(lines):
        lines.append(f"… and {count - len(lines)} more")
    return lines


def _link(public_url: str | None, path: str, query: Mapping[str, str] | None = None) -> list[str]:
    if not public_url:
        return []
    return [public_url.rstrip("/") + path + (f"?{urlencode(query)}" if query else "")]


def message(kind: str, occurrence: Mapping, table: str, public_url: str | None = None) -> tuple[str, str]:
    """The title and body of the message for `occurrence` (what folded since the last one):
    short lines, the count and the table first, a link to the page when `public_url` is set."""
    if kind == STUCK:
        count, sweeps = occurrence["count"], occurrence.get("sweeps", 1)
        title = f"{_plural(count, 'stuck run')} failed in {table}"
        lines = [f"{_plural(sweeps, 'sweep')} found them; each gets its retry unless its budget is spent."]
        if occurrence.get("kinds"):
            lines.append(f"Kinds: {_counts(occurrence['kinds'])}")
        lines += _labels(occurrence["labels"], count)
        lines += _link(public_url, "/runs", {"status": "failed"})
    elif kind == PERMANENT:
        count = occurrence["count"]
        title = f"{_plural(count, 'chain')} permanently failed in {table}"
        lines = []
        if occurrence.get("patterns"):
            lines.append(f"Patterns: {_counts(occurrence['patterns'])}")
        lines += _labels(occurrence["labels"], count)
        lines += [f"Last error: {error[:ERROR_WIDTH]}" for error in occurrence.get("errors", [])]
        lines += _link(public_url, "/dead-letters")
    elif kind == RETRY_FAILURE_RATE:
        ended, failed = occurrence["ended"], occurrence["failed"]
        title = f"{failed} of {_plural(ended, 'retry', 'retries')} failed in the last hour in {table}"
        lines = [f"{round(100 * failed / ended)}% of the retries that ended failed."]
        if occurrence.get("target"):
            target_failed, target_ended = occurrence["target_failed"], occurrence["target_ended"]
            lines.append(f"Worst target: {occurrence['target']} ({target_failed} of {target_ended} failed)")
        lines += _link(public_url, "/stats")
    elif kind == CHECKER_SILENT:
        last = occurrence.get("last_finished")
        silent = timedelta(seconds=int(occurrence["silent_for_s"]))
        title = f"The stuck-run checker of {table} is silent"
        lines = [
            f"No check finished for {silent}." if last else f"No check has finished in {silent}.",
            f"Last finished check: {last}." if last else "No check has ever finished.",
            "Is a daemon running? `stuck-runs status` shows the jobs' last runs.",
        ]
        lines += _link(public_url, "/")
    else:
        raise ValueError(f"unknown event kind {kind!r}")
    return title, "\n".join(lines)


def trial_message(table: str | None) -> tuple[str, str]:
    """What `stuck-runs alert test` sends."""
    where = f" for {table}" if table else ""
    return f"stuck-runs test message{where}", "If you read this, stuck-runs can tell you when runs get stuck."
