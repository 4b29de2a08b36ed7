"""Dynamic batching for one model on one event loop (no Ray): concurrent calls share one
run of a batch function, a coroutine (the service's runs the model in a thread, so the
loop keeps serving).

A batch is formed only when the previous run has finished: requests that arrive while the
model is busy all go into the next run at once (up to max_batch_size), and a batch waits
for more requests at most `wait_s` after its oldest request arrived. Ray Serve's
`@serve.batch` instead forms batches on a timer whether or not the model is free, so under
load it queues many small batches behind the running one (measured: 32 clients got no more
throughput with batching than without; benchmarks/RESULTS.md).
"""
from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import Any, Awaitable, Callable, Protocol


class BatchObserver(Protocol):
    def __call__(self, size: int, waits_s: list[float], run_s: float, still_queued: int) -> None:
        """After each run: its batch size, each request's wait from arrival to the run's
        start, the run's seconds, and the requests left queued for the next batch."""


class Batcher:
    """`await submit(job)` -> that job's result from `await run(jobs)`, which takes a list of
    jobs and returns one result per job, in order (an Exception instance = that job failed).
    `observe`, if given, is told about every run (metrics; it must not raise)."""

    def __init__(self, run: Callable[[list], Awaitable[list]], max_batch_size: int, wait_s: float,
                 observe: BatchObserver | None = None):
        self.run, self.max_batch_size, self.wait_s, self.observe = run, max_batch_size, wait_s, observe
        self.stats = {"forward_requests": 0, "batches": 0, "largest_batch": 0}
        self._queue: deque[tuple[Any, asyncio.Future, float]] = deque()
        self._arrived: asyncio.Event | None = None  # made on the serving loop, with the worker
        self._worker: asyncio.Task | None = None

    async def submit(self, job: Any) -> Any:
        loop = asyncio.get_running_loop()
        if self._worker is None or self._worker.done():
            self._arrived = asyncio.Event()
            self._worker = loop.create_task(self._work())
        future = loop.create_future()
        self._queue.append((job, future, loop.time()))
        self._arrived.set()
        result = await future  # a cancelled caller (timeout, client gone) is dropped from its batch
        if isinstance(result, Exception):
            raise result
        return result

    async def _next_batch(self) -> list[tuple[Any, asyncio.Future, float]]:
        while not self._queue:
            self._arrived.clear()
            await self._arrived.wait()
        loop = asyncio.get_running_loop()
        deadline = self._queue[0][2] + self.wait_s  # the oldest request waits no longer than wait_s
        while len(self._queue) < self.max_batch_size and loop.time() < deadline:
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), deadline - loop.time())
            except asyncio.TimeoutError:  # = TimeoutError from Python 3.11
                break
        count = min(self.max_batch_size, len(self._queue))
        batch = [self._queue.popleft() for _ in range(count)]
        return [item for item in batch if not item[1].done()]

    async def _work(self) -> None:
        while True:
            batch = await self._next_batch()
            if not batch:
                continue
            self.stats["batches"] += 1
            self.stats["forward_requests"] += len(batch)
            self.stats["largest_batch"] = max(self.stats["largest_batch"], len(batch))
            loop = asyncio.get_running_loop()
            start = loop.time()  # the clock the arrival times were taken on
            try:
                # the next batch forms only after this run: requests arriving meanwhile queue up
                results = await self.run([job for job, _, _ in batch])
            except Exception as e:  # the run itself failed (not one job): every job gets the error
                results = [e] * len(batch)
            run_s = loop.time() - start
            for (_, future, _), result in zip(batch, results):
                if not future.done():
                    future.set_result(result)
            if self.observe is not None:
                try:
                    self.observe(len(batch), [start - arrived for _, _, arrived in batch], run_s, len(self._queue))
                except Exception:  # statistics never stop the batches: logged, and serving goes on
                    logging.getLogger(__name__).exception("recording batch statistics failed")
