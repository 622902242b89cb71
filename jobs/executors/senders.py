"""The threads a delivering executor sends in (a webhook's POST, Scrapyd's schedule.json): the lane
waiting for a send gives up on it when `stop` is set or its bound has passed, so the send runs in
a thread of its own. Starting one per send cost more than the send; these are kept and reused, one
started only when none is idle, so a send stuck past its bound delays no other. Daemon threads: a
send stuck on a fleet that never answers holds no exit. (Celery sends in the lane itself: its send
is bounded by the broker's own timeouts, and the hand-off to a thread cost more than the send.)
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, TimeoutError
from typing import Generic, Protocol, TypeVar

T = TypeVar("T")


class Closes(Protocol):
    def close(self) -> None: ...


C = TypeVar("C", bound=Closes)
STOP_POLL_SECONDS = 0.1  # how soon a lane waiting for a send sees `stop`


def answer_within(sending: Future[T], stop: threading.Event, deadline: float) -> T | None:
    """What the send answered, or None when `stop` was set or `deadline` (time.monotonic) passed
    first; a send given up on before a sender took it is cancelled: it never runs."""
    while not stop.is_set():
        left = deadline - time.monotonic()
        if left <= 0:
            break
        try:
            return sending.result(timeout=min(STOP_POLL_SECONDS, left))  # at once when it is in
        except TimeoutError:
            continue
    sending.cancel()
    return None


class Senders:
    """`submit(call)`: `call()` in an idle sender thread (a new one when none is idle); its Future.
    A Future cancelled before a sender took it never runs."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.work: queue.SimpleQueue = queue.SimpleQueue()
        self.lock = threading.Lock()
        self.idle = self.started = 0
        self.closed = False

    def submit(self, call: Callable[[], T]) -> Future[T]:
        future: Future[T] = Future()
        with self.lock:
            if self.idle:
                self.idle -= 1  # the one this send wakes
            elif not self.closed:
                self.started += 1
                threading.Thread(target=self.serve, name=f"{self.name}-{self.started}", daemon=True).start()
        self.work.put((future, call))
        return future

    def serve(self) -> None:
        while (item := self.work.get()) is not None:
            future, call = item
            if future.set_running_or_notify_cancel():  # not given up on before it started
                try:
                    future.set_result(call())
                except BaseException as exc:  # noqa: BLE001 - raised in the lane waiting for it
                    future.set_exception(exc)
            with self.lock:
                self.idle += 1

    def close(self) -> None:
        """Ends the idle senders, and each busy one once its send is over."""
        with self.lock:
            self.closed = True
            for _ in range(self.started):
                self.work.put(None)


class ClientPerThread(Generic[C]):
    """An HTTP client (`make()`) for each thread that calls the fleet, made on its first call and
    used by that thread only. httpcore 1.0's pool walks all its connections at every request and
    every answer (for each idle one, all of them again): one client shared by 100 lanes spent most
    of a delivery's CPU there. A client of its own, one connection kept alive, never queues a
    request either (encode/httpcore#1110: a pool closing a connection it just gave out)."""

    def __init__(self, make: Callable[[], C]) -> None:
        self.make = make
        self.local = threading.local()
        self.lock = threading.Lock()
        self.clients: list[tuple[threading.Thread, C]] = []
        self.closed = False

    def get(self) -> C:
        client = getattr(self.local, "client", None)
        if client is not None:
            return client
        client = self.make()
        with self.lock:
            # A pass's lanes end with it: their clients (a socket each) go, not one more a pass.
            ended = [c for thread, c in self.clients if not thread.is_alive()]
            self.clients = [(thread, c) for thread, c in self.clients if thread.is_alive()]
            closed = self.closed
            if not closed:
                self.clients.append((threading.current_thread(), client))
        for old in ended + ([client] if closed else []):
            old.close()  # closed: a call on it raises, as on a closed shared client
        self.local.client = client
        return client

    def close(self) -> None:
        with self.lock:
            self.closed = True
            clients, self.clients = self.clients, []
        for _, client in clients:
            client.close()
