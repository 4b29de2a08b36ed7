"""A replica's bounded waits and its health (serve/gate.py, issue 23 N1 and N3), on a real
event loop, real threads and the tiny model: a long batch of forward passes that keep
finishing is never "stuck" (only one pass overrunning the timeout is), callers wait for
the model on the event loop (no executor thread each), and the number waiting is bounded."""
import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from vdvae_dist.serve.gate import Heartbeat, Slots
from vdvae_dist.serve.requests import RequestError


class Clock:
    """A clock the test moves: no timing in the assertions."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def tiny_sampler():
    import torch

    from vdvae_dist.artifacts.weights import Weights
    from vdvae_dist.config import load
    from vdvae_dist.model import build_model
    from vdvae_dist.serve.sampler import Sampler

    cfg = load("tiny")
    torch.manual_seed(0)
    return Sampler(Weights(build_model(cfg.model).eval(), cfg, 0, "test"), torch.device("cpu"), max_images=1)


def _clocked(sampler, seconds_per_pass: float):
    """Every forward pass of the sampler's model takes `seconds_per_pass` on a test clock
    (a pass holding seed 99 then fails; the others give blank images, quickly); returns
    what the replica's health check (heartbeat.stuck) said as each pass began."""
    import torch

    clock = Clock()
    sampler.heartbeat = Heartbeat(clock)
    seen = []

    def sample_batch(specs):
        seen.append(sampler.heartbeat.stuck(timeout_s=10.0))
        clock.now += seconds_per_pass
        if any(seed == 99 for _, _, seed in specs):
            raise RuntimeError("this pass fails")
        return [torch.zeros((n, 3, 32, 32), dtype=torch.uint8) for n, _, _ in specs]

    sampler.model.sample_batch = sample_batch
    return seen


def test_a_long_batch_of_passes_that_keep_finishing_is_never_stuck(tiny_sampler):
    """8 jobs in passes of one image: 8 passes of 6 s each (48 s in all, with a 10 s
    timeout), then a failing pass of two jobs re-run job by job (18 s): health never fails."""
    seen = _clocked(tiny_sampler, seconds_per_pass=6.0)
    temps = [1.0] * tiny_sampler.model.num_groups
    jobs = [{"n": 1, "temperature": temps, "seed": s} for s in range(8)]
    try:
        out = tiny_sampler.sample_many(jobs)
        assert all(o.shape == (1, 3, 32, 32) for o in out) and len(seen) == 8
        tiny_sampler.max_images = 2
        out = tiny_sampler.sample_many([jobs[0], {**jobs[1], "seed": 99}])
        assert isinstance(out[1], RuntimeError) and out[0].shape == (1, 3, 32, 32) and len(seen) == 11
        assert seen == [None] * 11
        assert tiny_sampler.heartbeat.stuck(10.0) is None and tiny_sampler.heartbeat.last is None  # idle
    finally:
        tiny_sampler.max_images = 1
        del tiny_sampler.model.sample_batch


def test_one_pass_overrunning_the_timeout_is_stuck(tiny_sampler):
    clock = Clock()
    beat = Heartbeat(clock)
    assert beat.stuck(10.0) is None  # idle
    beat.beat()
    clock.now += 9.0
    assert beat.stuck(10.0) is None
    clock.now += 2.0
    message = beat.stuck(10.0)
    assert message and "11 s" in message and "serve.request_timeout_s=10" in message
    beat.beat()  # the pass finished: the next one has its own time
    assert beat.stuck(10.0) is None


def test_waiting_callers_hold_no_thread_and_past_max_waiting_get_503():
    """The loop's executor has 2 threads. One call holds the only model slot; 6 more wait
    (max_waiting=6), and an unrelated thread job still runs: waiting takes no thread. A 7th
    waiter is answered 503 at once, and when the held call ends the waiters run in order."""
    async def main():
        asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(2))
        model = Slots("the model", 1, max_waiting=6)
        release, order = threading.Event(), []

        def call(i):
            if i == 0:
                release.wait(30)  # bounded: a failing test ends
            order.append(i)
            return i

        first = asyncio.create_task(model.run(call, 0))
        while model.stats["running"] == 0:
            await asyncio.sleep(0)
        waiters = [asyncio.create_task(model.run(call, i)) for i in range(1, 7)]
        while model.stats["waiting"] < 6:
            await asyncio.sleep(0)
        assert await asyncio.wait_for(asyncio.to_thread(lambda: "free"), 30) == "free"  # a thread is still free
        with pytest.raises(RequestError) as e:
            await asyncio.wait_for(model.run(call, 7), 30)  # 30: bounds a wait that should not be
        assert e.value.status == 503 and "6 requests already wait for the model" in e.value.error
        release.set()
        assert await asyncio.gather(first, *waiters) == list(range(7))
        return order, model.stats

    order, stats = asyncio.run(main())
    assert order == list(range(7)) and stats == {"running": 0, "waiting": 0, "max_waiting": 6}


def test_the_batcher_is_never_refused_and_waits_are_bounded():
    async def main():
        model = Slots("the model", 1, max_waiting=0)
        release = threading.Event()
        held = asyncio.create_task(model.run(release.wait, 30))
        while model.stats["running"] == 0:
            await asyncio.sleep(0)
        with pytest.raises(RequestError) as refused:  # no waiting allowed...
            await asyncio.wait_for(model.run(lambda: 1), 30)
        batch = asyncio.create_task(model.run(lambda: "batch", exempt=True))  # ...but the batcher may wait
        decode = Slots("upload decoding", 1, max_waiting=4)
        hold_decode = threading.Event()
        busy = asyncio.create_task(decode.run(hold_decode.wait, 30))
        while decode.stats["running"] == 0:
            await asyncio.sleep(0)
        with pytest.raises(RequestError) as late:  # a bounded wait for a decoding slot
            await asyncio.wait_for(decode.run(lambda: 1, wait_s=0.05), 30)  # 30: bounds an unbounded wait
        hold_decode.set()
        release.set()
        await asyncio.gather(held, busy)
        return refused.value, late.value, await batch, decode.stats

    refused, late, batch, decode_stats = asyncio.run(main())
    assert refused.status == 503 and late.status == 503 and "no upload decoding slot within 0.05 s" in late.error
    assert batch == "batch" and decode_stats["waiting"] == 0 and decode_stats["running"] == 0


def test_a_cancelled_caller_keeps_the_slot_until_its_call_ends():
    """A request that times out (504) while its forward pass runs must not let the next
    call into the model while that pass still runs."""
    async def main():
        model = Slots("the model", 1, max_waiting=4)
        release, running = threading.Event(), []

        def call(i):
            running.append(i)
            if i == 0:
                release.wait(30)  # bounded: a failing test ends
            return len(running)

        first = asyncio.create_task(model.run(call, 0))
        while not running:
            await asyncio.sleep(0)
        first.cancel()
        second = asyncio.create_task(model.run(call, 1))
        for _ in range(100):
            await asyncio.sleep(0)
        assert running == [0] and model.stats["running"] == 1  # the cancelled call still holds the model
        release.set()
        return await second

    assert asyncio.run(main()) == 2


def test_jobs_of_requests_that_have_gone_are_not_run(tiny_sampler):
    """A request that timed out (or whose client left) sets its job's "gone" event: the
    passes not yet run skip it, so a burst of timed-out requests frees the model."""
    seen = _clocked(tiny_sampler, seconds_per_pass=1.0)
    temps = [1.0] * tiny_sampler.model.num_groups
    jobs = [{"n": 1, "temperature": temps, "seed": s, "gone": threading.Event()} for s in range(4)]
    jobs[1]["gone"].set()
    jobs[2]["gone"].set()
    try:
        out = tiny_sampler.sample_many(jobs)
    finally:
        del tiny_sampler.model.sample_batch
    assert len(seen) == 2 and out[0].shape == out[3].shape == (1, 3, 32, 32)
    assert isinstance(out[1], TimeoutError) and isinstance(out[2], TimeoutError)
