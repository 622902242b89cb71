"""Requests of many threads served in sets (the hand-over's marks and confirms, jobs/delivery.py).

A thread that asks while no set is being served serves every request waiting at that moment (its
own included) with one call; threads asking meanwhile wait, holding nothing (no session), and the
first of them to wake after that call serves the next set. So however many threads ask, one call
runs at a time, and each call serves as many requests as were waiting for it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")

_UNSERVED = object()


class _Ticket:
    __slots__ = ("request", "result", "error")

    def __init__(self, request: object) -> None:
        self.request, self.result, self.error = request, _UNSERVED, None


class Batches(Generic[T, R]):
    """`ask(request)` answers with `serve(requests)[i]`, `requests` being the set `request` was served
    in (`serve` returns one answer per request, in their order). An error `serve` raises is raised
    in every thread of that set."""

    def __init__(self, serve: Callable[[Sequence[T]], Sequence[R]]) -> None:
        self._serve = serve
        self._changed = threading.Condition(threading.Lock())
        self._waiting: list[_Ticket] = []
        self._serving = False

    def ask(self, request: T) -> R:
        ticket = _Ticket(request)
        with self._changed:
            self._waiting.append(ticket)
            while ticket.result is _UNSERVED and ticket.error is None:
                if self._serving:
                    self._changed.wait()
                    continue
                batch, self._waiting, self._serving = self._waiting, [], True
                self._changed.release()  # the call runs unlocked: others queue for the next set
                try:
                    results, error = self._serve([t.request for t in batch]), None
                except BaseException as exc:  # noqa: BLE001 - every waiter of the set gets it
                    results, error = (), exc
                finally:
                    self._changed.acquire()
                    self._serving = False
                for i, waiter in enumerate(batch):
                    if error is not None:
                        waiter.error = error
                    else:
                        waiter.result = results[i]
                self._changed.notify_all()
        if ticket.error is not None:
            raise ticket.error
        return ticket.result  # type: ignore[return-value]


class Combined(Generic[T]):
    """`add(item)` hands `item` to `write(items)` without waiting for it: the thread that adds while
    no set is being written writes every item added until none is left (its own first), in sets;
    threads adding meanwhile go on at once. So one `write` runs at a time, each over as many items
    as came while the last one ran, and no item is left unwritten once every `add` has returned.
    An error `write` raises is raised in the thread writing (its set's items were not written)."""

    def __init__(self, write: Callable[[Sequence[T]], None]) -> None:
        self._write = write
        self._lock = threading.Lock()
        self._waiting: list[T] = []
        self._writing = False

    def add(self, item: T) -> None:
        with self._lock:
            self._waiting.append(item)
            if self._writing:
                return  # the thread writing takes it in its next set
            self._writing = True
        try:
            while True:
                with self._lock:
                    items, self._waiting = self._waiting, []
                    if not items:
                        self._writing = False
                        return
                self._write(items)
        except BaseException:
            with self._lock:
                self._writing = False
            raise
