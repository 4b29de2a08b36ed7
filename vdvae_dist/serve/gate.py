"""Bounded waits for a replica's blocking work (no Ray): `Slots` runs blocking calls in
threads a few at a time, with a bounded number of callers waiting (the rest get a 503 at
once) and optionally a bounded wait. A caller waits on the event loop, not in a thread, so
waiting requests hold no executor thread (issue 23 N3). `Heartbeat` says how long the model
has gone without progress, so a long but progressing batch is not mistaken for a hung one
(issue 23 N1).
"""
from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import Callable

from .requests import RETRY_AFTER_S, RequestError


class Slots:
    """At most `count` calls of blocking functions at once, each in a thread, and at most
    `max_waiting` callers waiting for a slot (FIFO). A slot is freed when its thread ends,
    not when its caller gives up: a cancelled request cannot let a second call into a
    model whose first call still runs."""

    def __init__(self, name: str, count: int, max_waiting: int):
        self.name, self.count, self.max_waiting = name, count, max_waiting
        self.free = count
        self._waiters: deque[asyncio.Future] = deque()

    @property
    def stats(self) -> dict:
        return {"running": self.count - self.free, "waiting": len(self._waiters), "max_waiting": self.max_waiting}

    def _busy(self, why: str) -> RequestError:
        return RequestError("request", f"the replica is busy: {why}", f"a retry after {RETRY_AFTER_S} s",
                            status=503)

    async def _acquire(self, wait_s: float | None, exempt: bool) -> None:
        if self.free > 0 and not self._waiters:
            self.free -= 1
            return
        if not exempt and len(self._waiters) >= self.max_waiting:
            raise self._busy(f"{self.max_waiting} requests already wait for {self.name}")
        slot = asyncio.get_running_loop().create_future()
        self._waiters.append(slot)
        try:
            if wait_s is None:
                await slot
            else:
                async with asyncio.timeout(wait_s):
                    await slot
        except BaseException as e:
            if slot.done() and not slot.cancelled():  # handed a slot, then cancelled: pass it on
                self._release()
            else:
                slot.cancel()
                self._waiters.remove(slot)
            if isinstance(e, TimeoutError):
                raise self._busy(f"no {self.name} slot within {wait_s:g} s") from None
            raise

    def _release(self, _done: asyncio.Future | None = None) -> None:
        if _done is not None and not _done.cancelled():
            _done.exception()  # retrieved here: a caller that gave up no longer awaits it
        while self._waiters:
            slot = self._waiters.popleft()
            if not slot.done():
                slot.set_result(None)  # the slot goes straight to the next waiter
                return
        self.free += 1

    async def run(self, fn: Callable, *args, wait_s: float | None = None, exempt: bool = False):
        """fn(*args) in a thread once a slot is free. 503 (RequestError) when max_waiting
        callers already wait (unless exempt) or no slot came within wait_s."""
        await self._acquire(wait_s, exempt)
        try:
            call = asyncio.ensure_future(asyncio.to_thread(fn, *args))
        except BaseException:
            self._release()
            raise
        call.add_done_callback(self._release)
        return await asyncio.shield(call)  # a cancelled caller leaves the call running, holding its slot


class Heartbeat:
    """When the model last made progress: set when a call starts and at the end of every
    forward pass in it; None while idle. Only a pass that itself overruns a timeout counts
    as stuck, however long the batch of passes runs."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self.last: float | None = None

    def beat(self) -> None:
        self.last = self.clock()

    def stop(self) -> None:
        self.last = None

    def stuck(self, timeout_s: float) -> str | None:
        last = self.last
        if last is None:
            return None
        quiet = self.clock() - last
        if quiet <= timeout_s:
            return None
        return (f"a forward pass has run for {quiet:.0f} s without finishing, past serve.request_timeout_s="
                f"{timeout_s:g}")
