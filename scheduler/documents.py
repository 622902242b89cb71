"""Results as JSON documents: what `--json` prints and what the HTTP API answers, one shape for both."""

from __future__ import annotations

import dataclasses
import functools
import json
import uuid
from datetime import datetime, timedelta, timezone
from typing import Any

from jobs.model import as_utc


@functools.cache
def _shown_names(kind: type) -> tuple[str, ...]:
    """A result type's fields and properties, as JSON shows them (looked up once per type)."""
    fields = [f.name for f in dataclasses.fields(kind) if f.repr]
    properties = [n for n in dir(kind) if isinstance(getattr(kind, n, None), (property, functools.cached_property))]
    return (*fields, *properties)


def plain(value: Any) -> Any:
    if hasattr(value, "document") and callable(value.document):
        return plain(value.document())  # a result that says itself what a script reads
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {name: plain(getattr(value, name)) for name in _shown_names(type(value))}
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [plain(v) for v in value]
    if isinstance(value, datetime):
        return as_utc(value).astimezone(timezone.utc).isoformat()  # ISO 8601 with its offset, in UTC
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, uuid.UUID):
        return str(value)
    return value


def json_text(value: Any) -> str:
    """One value as JSON text (`{"pages": 3}`, `null`, `"Belgium"`): how `dlq show` and the dead-letters
    page show a run's inputs, never as Python's reprs."""
    return json.dumps(plain(value), ensure_ascii=False, default=str)
