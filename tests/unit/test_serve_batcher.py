"""The service's dynamic batching (serve/batcher.py) on a real event loop and real threads:
batches form only when the model is free, up to max_batch_size, and a job fails alone."""
import asyncio
import threading

import pytest

from vdvae_dist.serve.batcher import Batcher


class Model:
    """A batch function whose runs can be held open, recording every batch it was given."""

    def __init__(self):
        self.batches: list[list] = []
        self.started = threading.Event()
        self.release = threading.Event()
        self.release.set()

    def __call__(self, jobs: list) -> list:
        self.batches.append(list(jobs))
        self.started.set()
        self.release.wait()
        return [ValueError(f"job {j} is bad") if j == "bad" else j * 10 for j in jobs]

    async def run(self, jobs: list) -> list:  # as the service runs the model: in a thread
        return await asyncio.to_thread(self, jobs)

    def hold(self) -> None:
        self.started.clear()
        self.release.clear()


async def _queued(batcher: Batcher, count: int) -> None:
    """Turns of the loop until `count` submits are queued (each task appends before its
    first await); bounded, so a batcher that took them early fails the test, not hangs it."""
    for _ in range(1000):
        if len(batcher._queue) >= count:
            return
        await asyncio.sleep(0)


async def _model_held_by_first_job(max_batch_size: int, job):
    """A batcher (no batch wait) whose model is busy running `job` alone until released."""
    model = Model()
    batcher = Batcher(model.run, max_batch_size=max_batch_size, wait_s=0.0)
    model.hold()
    first = asyncio.create_task(batcher.submit(job))
    await asyncio.to_thread(model.started.wait)
    return model, batcher, first


def test_requests_arriving_while_the_model_runs_share_the_next_run():
    async def main():
        model, batcher, first = await _model_held_by_first_job(max_batch_size=32, job=1)
        rest = []
        for j in range(2, 7):  # one at a time, each with turns of the loop a batcher could use
            rest.append(asyncio.create_task(batcher.submit(j)))
            for _ in range(10):
                await asyncio.sleep(0)
        await _queued(batcher, 5)
        model.release.set()
        assert await first == 10 and await asyncio.gather(*rest) == [20, 30, 40, 50, 60]
        return model.batches, batcher.stats

    batches, stats = asyncio.run(main())
    assert batches == [[1], [2, 3, 4, 5, 6]]  # one run for all five, not one per arrival
    assert stats == {"forward_requests": 6, "batches": 2, "largest_batch": 5}


def test_a_batch_holds_at_most_max_batch_size_jobs_in_arrival_order():
    async def main():
        model, batcher, first = await _model_held_by_first_job(max_batch_size=4, job=0)
        rest = [asyncio.create_task(batcher.submit(j)) for j in range(1, 11)]
        await _queued(batcher, 10)
        model.release.set()
        await asyncio.gather(first, *rest)
        return model.batches

    assert asyncio.run(main()) == [[0], [1, 2, 3, 4], [5, 6, 7, 8], [9, 10]]


def test_a_full_batch_runs_without_waiting_out_the_batch_wait():
    """wait_s is an upper bound: four jobs fill a batch of four at once (a wrong wait here
    would hold the test for an hour, bounded by the 60 s timeout)."""
    async def main():
        model = Model()
        batcher = Batcher(model.run, max_batch_size=4, wait_s=3600.0)
        results = await asyncio.wait_for(asyncio.gather(*(batcher.submit(j) for j in range(4))), 60)
        return results, model.batches

    results, batches = asyncio.run(main())
    assert results == [0, 10, 20, 30] and batches == [[0, 1, 2, 3]]


def test_a_failing_job_fails_alone_and_a_failing_run_fails_only_its_batch():
    async def main():
        model, batcher, first = await _model_held_by_first_job(max_batch_size=8, job=1)
        jobs = [asyncio.create_task(batcher.submit(j)) for j in (2, "bad", 3)]
        await _queued(batcher, 3)
        model.release.set()
        out = await asyncio.gather(first, *jobs, return_exceptions=True)

        broken = Batcher(lambda jobs: 1 / 0, max_batch_size=8, wait_s=0.0)
        with pytest.raises(ZeroDivisionError):
            await broken.submit(1)
        broken.run = model.run  # the worker survived the failed run: the next job is served
        return out, await broken.submit(4)

    out, after = asyncio.run(main())
    assert out[0] == 10 and out[1] == 20 and out[3] == 30
    assert isinstance(out[2], ValueError) and "job bad" in str(out[2])
    assert after == 40


def test_a_caller_that_gave_up_is_dropped_from_its_batch():
    """A request answered 504 (or whose client left) while queued never reaches the model."""
    async def main():
        model, batcher, first = await _model_held_by_first_job(max_batch_size=8, job=1)
        gone, kept = asyncio.create_task(batcher.submit(2)), asyncio.create_task(batcher.submit(3))
        await _queued(batcher, 2)
        gone.cancel()
        model.release.set()
        return await first, await kept, gone.cancelled(), model.batches

    first, kept, cancelled, batches = asyncio.run(main())
    assert (first, kept, cancelled) == (10, 30, True)
    assert batches == [[1], [3]]


def test_the_observer_hears_every_run_with_its_size_waits_and_what_is_left_queued():
    """The batch statistics behind the Ray metrics (serve/metrics.py): one call per run,
    after the run's answers went out; a failing observer does not stop the batches."""
    heard = []

    def observe(size, waits_s, run_s, still_queued):
        heard.append((size, len(waits_s), still_queued))
        assert all(w >= 0 for w in waits_s) and run_s >= 0
        raise RuntimeError("a broken metrics backend")

    async def main():
        model = Model()
        batcher = Batcher(model.run, max_batch_size=2, wait_s=0.0, observe=observe)
        model.hold()
        first = asyncio.create_task(batcher.submit(1))
        await asyncio.to_thread(model.started.wait)
        rest = [asyncio.create_task(batcher.submit(j)) for j in (2, 3, 4)]
        await _queued(batcher, 3)
        model.release.set()
        assert await first == 10 and await asyncio.gather(*rest) == [20, 30, 40]

    asyncio.run(main())
    # runs of 1, then 2 (one left for the next), then 1
    assert heard == [(1, 1, 3), (2, 2, 1), (1, 1, 0)]
