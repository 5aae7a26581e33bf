"""Admission: every request is counted from its arrival, and its work before the model runs is bounded.

A request enters when its headers arrive (`Admission.enter`; a full count answers 429 at once) and gets a
`Ticket` with its deadline (arrival + the request timeout). From then on it is *waiting* until the model
thread takes its job, or until it fails, finishes or is abandoned; `/health`'s `queue` is this count, and
the limit (`max_queue`) bounds the bodies held, parsed and decoded at any moment.

The blocking steps before the model (parsing the JSON, decoding images, tokenizing) run on a small pool of
`prep_threads` threads, never on the event loop and never on an unbounded pool; each step waits for its
thread within the request's deadline (504 past it), and a step whose request has already left is skipped.
"""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, TypeVar

from .errors import APIError

T = TypeVar("T")


class Ticket:
    """One admitted request: its deadline, and its place in the count until `leave()` (idempotent)."""

    def __init__(self, admission: Admission, timeout_s: float):
        self.admission, self.timeout_s = admission, timeout_s
        self.deadline = time.monotonic() + timeout_s
        self.left = False

    def remaining(self) -> float:
        return max(self.deadline - time.monotonic(), 0.0)

    def leave(self) -> None:
        self.admission._leave(self)

    def timed_out(self) -> APIError:
        return APIError(504, f"the request did not finish within the server's timeout of {self.timeout_s:g} s",
                        "timeout")

    async def within_deadline(self, awaitable: Any) -> Any:
        """`awaitable`'s result, or 504 when the request's deadline passes first."""
        try:
            return await asyncio.wait_for(awaitable, self.remaining())
        except asyncio.TimeoutError:
            raise self.timed_out() from None

    async def prepare(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` on the pre-processing pool, within the deadline (skipped if the request left meanwhile)."""

        def step() -> T:
            if self.left or time.monotonic() > self.deadline:
                raise self.timed_out()
            return fn(*args)

        loop = asyncio.get_running_loop()
        return await self.within_deadline(loop.run_in_executor(self.admission.pool, step))


class Admission:
    """The count of waiting requests (bounded by `max_queue`) and the pre-processing pool."""

    def __init__(self, max_queue: int, prep_threads: int):
        self.max_queue = max_queue
        self.waiting = 0
        self._lock = threading.Lock()  # tickets leave from the model thread too
        self.pool = ThreadPoolExecutor(prep_threads, thread_name_prefix="mmlm-prep")

    def enter(self, timeout_s: float) -> Ticket:
        with self._lock:
            if self.waiting >= self.max_queue:
                raise APIError(429, f"the server is busy: the queue is full ({self.max_queue} requests waiting); "
                                    "retry shortly", "queue_full")
            self.waiting += 1
        return Ticket(self, timeout_s)

    def _leave(self, ticket: Ticket) -> None:
        with self._lock:
            if not ticket.left:
                ticket.left = True
                self.waiting -= 1

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
