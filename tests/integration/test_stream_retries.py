"""Shard-level retries against a real S3-protocol server (moto): a shard whose reads fail
with a transient storage error is reopened and the read continues at the sample where it
broke, so the stream (and an exact resume) is the one without the errors.

The errors come from `flaky://BUCKET/PATH`, a small fsspec filesystem registered here: it is
fsspec's own DirFileSystem over the real s3fs filesystem (so every byte comes from the S3
server), except that opening a path listed in FAULTS takes the next entry of its plan:
"open" fails the open, N fails the read once N bytes have been read; with the plan used
up, opens are clean. The failures are ConnectionResetError, as a dropped connection gives."""
import math
import re

import fsspec
import numpy as np
import pytest
from fsspec.implementations.dirfs import DirFileSystem

from vdvae_dist.data.format import encode_image
from vdvae_dist.data.shardwriter import TAR_MEMBER_OVERHEAD, build
from vdvae_dist.data.stream import ShardStream, StreamSpec, eval_loader, split_urls, train_loader

pytestmark = pytest.mark.integration

FAULTS: dict[str, list] = {}  # bucket/path -> plan of the next opens
BATCH, SEED, PER_SHARD = 16, 2, 40


class _BreaksAfter:
    def __init__(self, f, at: int):
        self.f, self.at, self.pos = f, at, 0

    def read(self, n=-1):
        data = self.f.read(n)
        if self.pos + len(data) > self.at:
            raise ConnectionResetError(f"connection reset after {self.at} bytes (injected)")
        self.pos += len(data)
        return data

    def close(self):
        self.f.close()


class FlakyFileSystem(DirFileSystem):
    protocol = "flaky"

    def __init__(self, **storage_options):
        super().__init__(path="/", target_protocol="s3", **storage_options)  # "/": the bucket level
        assert self.path == ""

    def open(self, path, mode="rb", **kwargs):
        path = self._strip_protocol(path)
        plan = FAULTS.get(path)
        fault = plan.pop(0) if plan else None
        if fault == "open":
            raise ConnectionResetError(f"{path}: connection reset while opening (injected)")
        f = super().open(path, mode, **kwargs)
        return f if fault is None else _BreaksAfter(f, fault)


fsspec.register_implementation("flaky", FlakyFileSystem, clobber=True)


@pytest.fixture
def dataset(s3_bucket, tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (440, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "src.npz", data=images)
    # the builder fixes samples per shard from the mean encoded size of the first 32 images
    mean = sum(len(encode_image(img)) + TAR_MEMBER_OVERHEAD for img in images[:32]) / 32
    m = build(f"npz:{tmp_path / 'src.npz'}", f"s3://{s3_bucket}/ds", 8, val=40,
              shard_bytes=math.ceil(PER_SHARD * mean), progress=False)
    assert [s.samples for s in m.shards] == [PER_SHARD] * 11
    assert min(s.bytes for s in m.shards) > 30_000  # a break at 20 kB is mid-shard
    FAULTS.clear()
    yield s3_bucket
    FAULTS.clear()


def _epoch0(url) -> list[str]:
    """bucket/path of the train shards in the order epoch 0 of one reader reads them."""
    urls, _ = split_urls(url, "train")
    order = ShardStream(StreamSpec(urls, 3, BATCH, seed=SEED)).shards_for(0, 0, 1)
    return [fsspec.core.strip_protocol(urls[i]) for i in order]


def _take(loader, n):
    return [next(loader) for _ in range(n)]


def _same(a, b):
    return len(a) == len(b) and all(x.shape == y.shape and bool((x == y).all()) for x, y in zip(a, b))


def test_transient_errors_are_retried_and_the_stream_continues_exactly(dataset, caplog):
    kw = dict(seed=SEED, shuffle_buffer=30, num_workers=0, random_flip=True, shard_retry_wait=0.01)
    s3, flaky = f"s3://{dataset}/ds", f"flaky://{dataset}/ds"
    reference = _take(train_loader(s3, BATCH, **kw), 30)  # 480 images: into epoch 1
    order = _epoch0(s3)
    # two failed opens; three breaks at the same byte (the default 3 retries, none gaining ground)
    plan = {order[0]: ["open", "open"], order[3]: [20_000, 20_000, 20_000], order[5]: [20_000]}
    FAULTS.update({k: list(v) for k, v in plan.items()})
    loader = train_loader(flaky, BATCH, **kw)
    assert _same(_take(loader, 30), reference) and loader.bad_samples == 0
    assert not any(FAULTS.values())  # every planned failure happened
    assert len(re.findall(r"retrying flaky://\S+ from sample", caplog.text)) == 6
    assert re.search(rf"retrying flaky://{order[3]} from sample [1-9]\d* ", caplog.text)  # mid-shard: resumed there
    # exact resume from a position taken while the stream recovered from the errors
    FAULTS.update({k: list(v) for k, v in plan.items()})
    interrupted = train_loader(flaky, BATCH, **kw)
    _take(interrupted, 9)
    resumed = train_loader(s3, BATCH, state=interrupted.state_dict(), **kw)
    assert _same(_take(resumed, 21), reference[9:])


def test_a_shard_failing_past_its_retries_counts_its_unread_samples(dataset, caplog):
    flaky = f"flaky://{dataset}/ds"
    first = _epoch0(flaky)[0]
    FAULTS[first] = [20_000, 20_000, 20_000]
    loader = train_loader(flaky, BATCH, seed=SEED, shuffle_buffer=30, num_workers=0, shard_retries=1,
                          shard_retry_wait=0.01, max_bad_fraction=0.9)
    _take(loader, 10)
    assert FAULTS[first] == [20_000]  # 1 retry, then given up: no third open
    read = int(re.search(rf"retrying flaky://{first} from sample (\d+) ", caplog.text).group(1))
    assert 0 < read < PER_SHARD and loader.bad_samples == PER_SHARD - read  # those it holds and that were not read
    assert f"skipped shard in flaky://{first}: ConnectionResetError" in caplog.text


def test_an_exact_pass_retries_too(dataset):
    flaky = f"flaky://{dataset}/ds"
    FAULTS[fsspec.core.strip_protocol(split_urls(flaky, "val")[0][0])] = ["open", 20_000]
    keys = [k for _, ks in eval_loader(flaky, "val", 16, num_workers=0, shard_retry_wait=0.01) for k in ks]
    assert keys == [f"val-{i:08d}" for i in range(PER_SHARD)] and not any(FAULTS.values())
