"""One compiled-statement cache for every engine a test process creates.

SQLAlchemy compiles a statement once per engine and keeps the result in that engine's cache,
keyed by the dialect *instance* and the statement's structure. A command, a runtime or an app is
a new engine, so each in-process command (tests/cli.py), each InProcessWeb and each test's runtime
compiled again every statement it ran, the reflection's catalog queries included: a fifth of the
adopted-tables tests' CPU. The SQL a statement compiles to depends only on its structure (that is
SQLAlchemy's own cache key) and on the dialect's configuration, so the engines here share one
cache in which the dialect instance is replaced by its configuration: an engine whose dialect is
configured differently (another driver, server version, JSON serializer, ...) gets entries of its
own. Nothing about what runs changes: the statements, their parameters and the round trips are
as before; only the compiling is done once.

Real processes (the console script, daemons, serve) are untouched: they compile as users' do.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

import sqlalchemy as sa
from sqlalchemy import util

# Dialect attributes that are derived from its class and the configuration kept in the others
# (the quoting rules, the type compiler) or are per-instance memos: left out of the key.
_DERIVED = frozenset({"identifier_preparer", "type_compiler", "type_compiler_instance", "_type_memos", "_hstore_oids"})
# The dialect memoizes statements of its own (its reflection queries) as attributes on first use.
_MEMOS = (sa.sql.ClauseElement,)


def _configuration(dialect: Any) -> tuple:
    """What sets the dialect apart: its class and every hashable setting. A setting whose value
    is an object of its own per engine hashes by identity, so such engines never share entries."""
    settings = []
    for name, value in sorted(vars(dialect).items()):
        if name in _DERIVED or isinstance(value, _MEMOS) or not isinstance(value, Hashable):
            continue
        settings.append((name, value))
    return (type(dialect), tuple(settings))


class SharedCompiledCache(util.LRUCache):
    """An engine's compiled cache whose keys name the dialect by its configuration."""

    @staticmethod
    def _shared(key: Any) -> Any:
        if isinstance(key, tuple) and key and isinstance(key[0], sa.engine.Dialect):
            return (_configuration(key[0]), *key[1:])
        return key

    def get(self, key: Any, default: Any = None) -> Any:
        return super().get(self._shared(key), default)

    def __getitem__(self, key: Any) -> Any:
        return super().__getitem__(self._shared(key))

    def __setitem__(self, key: Any, value: Any) -> None:
        super().__setitem__(self._shared(key), value)

    def __contains__(self, key: Any) -> bool:
        return super().__contains__(self._shared(key))


SHARED = SharedCompiledCache(5000)
_original_init = sa.engine.Engine.__init__


def _init_sharing(self: sa.Engine, *args: Any, **kwargs: Any) -> None:
    _original_init(self, *args, **kwargs)
    if self._compiled_cache is not None:  # query_cache_size=0 asked for none
        self._compiled_cache = SHARED


def share_compiled_statements() -> None:
    sa.engine.Engine.__init__ = _init_sharing  # type: ignore[method-assign]


def compile_per_engine() -> None:
    sa.engine.Engine.__init__ = _original_init  # type: ignore[method-assign]
