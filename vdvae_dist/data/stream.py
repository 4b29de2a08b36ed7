"""Stream WebDataset shards from object storage into uint8 batches.

Training stream (ShardStream, one per DataLoader worker, a "reader"): every rank reads its
own shards (split by node), every reader its own part of those (split by worker); the
shard order is a fresh permutation per epoch from the seed, or with `resampled` shards
are drawn with replacement (any rank may read any shard, so no rank starves when there
are fewer shards than readers). The stream is endless: each reader moves on to the next
epoch by itself.

Shuffling is block-wise, not a rolling buffer: a reader decodes images in reading order
into consecutive blocks of `shuffle_buffer` images (blocks run across shard and epoch
ends) and emits each block in a permutation seeded by where the block starts. Batches are
cut from that sequence; flips and binarization are seeded by the batch's end position.
Nothing depends on timing, so the stream is fixed by (seed, rank, world, readers).

Position: each batch carries its reader's pointer (epoch, shard slot and samples read
there where the current block began, images of that block already emitted).
`TrainLoader.state_dict()` holds the last pointer of every reader and the reader due
next; a loader built from it with the same number of readers re-reads the current block,
skips what was emitted and continues the exact stream (with another number of readers it
starts over from epoch 0).

Evaluation stream: an exact pass; shard i goes to rank i % world and within a rank to one
DataLoader worker, so every sample is seen exactly once and nothing is padded.

Shards are opened with fsspec (explicit storage options reach the filesystem) and split
into samples by webdataset's tar iterators. A transient storage error (a reset connection,
a timeout, a server error the storage client's own retries did not get past) reopens the
shard up to `shard_retries` times in a row, after `retry_wait`, 2 x `retry_wait`, ...
seconds, and the read continues after the last sample it gave out, so the stream (and an
exact resume) is the same as without the error. Bad data is skipped, counted in samples and
logged with the shard URL: a corrupt image, or one whose size or mode is not the dataset's,
counts one; a shard that is missing, denied, corrupt, truncated or still failing after its
retries counts the samples of it the manifest lists and that were not read. A worker fails
once more than `max_bad_fraction` of the samples it read were bad. URLs are shown with
any user:password part removed.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field

import fsspec
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .format import IMAGE_EXTS, binarize_pixels, decode_image
from .manifest import read_manifest
from ..artifacts.storage import join, options_for, redact

log = logging.getLogger(__name__)
_MIN_READ_BEFORE_FAILING = 64


# errors that are answers (missing object, access denied), not failures of the transport
_PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)
# storage clients whose own exception classes are transport failures (connection, timeout,
# incomplete response) when they reach us after the client's retries
_CLIENT_PACKAGES = {"aiohttp", "aiobotocore", "botocore", "urllib3", "requests", "http", "gcsfs", "google"}


def transient(exn: BaseException) -> bool:
    """Whether a storage error may go away on a retry: an OSError other than not-found /
    access-denied (s3fs raises those for server errors it gave up on), or a storage
    client's own error. Bad content (a corrupt or truncated tar) is not transient."""
    if isinstance(exn, _PERMANENT):
        return False
    if isinstance(exn, OSError):
        return True
    return any(c.__module__.split(".")[0] in _CLIENT_PACKAGES for c in type(exn).__mro__)


def _describe(exn: BaseException) -> str:
    return f"{type(exn).__name__}: {exn}"


def _read_shard(url: str, storage_options: dict | None = None, start: int = 0, retries: int = 0,
                wait: float = 1.0):
    """(index, key, image bytes) of the image samples of one tar shard, in order, from
    sample `start` on (the ones before it are read past, not decoded), via webdataset's tar
    iterators on an fsspec stream (so explicit storage options reach the filesystem).

    A transient storage error reopens the shard after wait, 2 x wait, ... seconds and goes
    on after the last sample given out, up to `retries` times in a row without progress
    (a retry that gets further starts the count again). Other errors, and a transient one
    past its retries, are raised."""
    from webdataset.tariterators import group_by_keys, tar_file_iterator

    done, failures, failed_at = start, 0, -1
    while True:
        stream = None
        try:
            stream = fsspec.open(url, "rb", **{**options_for(url), **(storage_options or {})}).open()
            files = ({**f, "__url__": url} for f in tar_file_iterator(stream))
            index = 0
            for sample in group_by_keys(files):
                data = next((sample[ext] for ext in IMAGE_EXTS if ext in sample), None)
                if data is None:
                    continue
                if index >= done:
                    yield index, sample["__key__"], data
                    done = index + 1
                index += 1
            return
        except Exception as exn:
            if not transient(exn):
                raise
            failures = failures + 1 if done == failed_at else 1
            failed_at = done
            if failures > retries:
                raise
            delay = wait * 2 ** (failures - 1)
            log.warning("%s", redact(f"retrying {url} from sample {done} in {delay:g} s "
                                     f"(retry {failures} of {retries}) after a storage error: {_describe(exn)}"))
            time.sleep(delay)
        finally:
            if stream is not None:
                try:
                    stream.close()
                except Exception:  # closing a broken connection may fail as well
                    pass


@dataclass
class StreamSpec:
    urls: list[str]  # shard URLs of one split, manifest order
    channels: int
    batch_size: int  # per rank
    seed: int = 0
    rank: int = 0
    world: int = 1
    shuffle_buffer: int = 1000
    random_flip: bool = False
    binarize: bool = False
    resampled: bool = False
    max_bad_fraction: float = 0.01
    # reader -> [epoch, shard slot, samples read there when its shuffle block began, images
    # of that block already emitted]: where each reader resumes
    pointers: dict = field(default_factory=dict)
    workers: int = 1  # DataLoader workers the pointers belong to
    rotation: int = 0  # the reader whose batch comes next
    storage_options: dict = field(default_factory=dict, repr=False)  # fsspec options; may hold secrets
    resolution: int | None = None  # image side (manifest); None: images are not checked
    counts: list[int] = field(default_factory=list)  # samples per shard (manifest); []: unknown
    shard_retries: int = 3  # retries of a shard after a transient storage error, in a row
    retry_wait: float = 1.0  # seconds before the first retry of a shard; doubled for each next one


class _Counters:
    def __init__(self, spec: StreamSpec):
        self.spec, self.read, self.bad, self.last_error = spec, 0, 0, ""

    def good(self) -> None:
        self.read += 1

    def failure(self, what: str, url: str, exn: BaseException | str, samples: int = 1) -> None:
        """`samples` samples lost to one fault (a bad image: 1; a shard: those not read)."""
        self.read += samples
        self.bad += samples
        self.last_error = redact(f"{what} in {url}: {exn}")
        log.warning("%s", redact(f"skipped {what} in {url}: {exn} ({samples} sample(s) lost; "
                                 f"{self.bad} bad of {self.read} samples read)"))
        if self.read >= _MIN_READ_BEFORE_FAILING and self.bad > self.spec.max_bad_fraction * self.read:
            raise RuntimeError(f"{self.bad} of {self.read} samples read were bad (last: {self.last_error}); "
                               f"more than data.max_bad_fraction={self.spec.max_bad_fraction}")


class ShardStream(IterableDataset):
    """One reader's endless training batches, each with its read pointer (see the header)."""

    def __init__(self, spec: StreamSpec):
        super().__init__()
        self.spec = spec

    def shards_for(self, epoch: int, worker: int, workers: int) -> list[int]:
        s, n = self.spec, len(self.spec.urls)
        if s.resampled:
            per_reader = max(1, n // (s.world * workers))
            return np.random.default_rng([s.seed, epoch, s.rank, worker]).integers(0, n, per_reader).tolist()
        order = np.random.default_rng([s.seed, epoch]).permutation(n)
        return order[s.rank :: s.world][worker::workers].tolist()

    def __iter__(self):
        s = self.spec
        info = get_worker_info()
        workers = info.num_workers if info else 1
        # DataLoader asks its workers in turn starting from id 0; a resumed loader rotates the
        # roles so that its first batch comes from the reader the interrupted stream was due at
        worker = ((info.id if info else 0) + s.rotation) % workers
        pointer = s.pointers.get(worker, [0, 0, 0, 0]) if s.workers == workers else [0, 0, 0, 0]
        epoch, slot, skip, emitted = pointer
        counters = _Counters(s)
        batch: list[np.ndarray] = []
        for start, block in self._blocks(worker, workers, epoch, slot, skip, counters):
            # shuffle one block of `shuffle_buffer` images at a time, seeded by where the block
            # starts: a stream resumed from a pointer re-reads the block and draws exactly what
            # the uninterrupted stream drew
            order = np.random.default_rng([s.seed, s.rank, worker, *start]).permutation(len(block))
            for i in range(emitted, len(block)):
                batch.append(block[order[i]])
                if len(batch) == s.batch_size:
                    after = (*start, i + 1)
                    rng = np.random.default_rng([s.seed, s.rank, worker, *after])
                    yield self._collate(batch, rng), (worker, *after, counters.bad)
                    batch = []
            emitted = 0

    def _blocks(self, worker: int, workers: int, epoch: int, slot: int, skip: int, counters: _Counters):
        """Blocks of `shuffle_buffer` decoded images in reading order, each with the read
        pointer (epoch, shard slot, samples read in that shard) where it starts."""
        s = self.spec
        block: list[np.ndarray] = []
        start = (epoch, slot, skip)
        while True:
            shards = self.shards_for(epoch, worker, workers)
            if not shards:
                raise ValueError(f"rank {s.rank} worker {worker} has no shards: {len(s.urls)} shards for "
                                 f"{s.world} ranks x {workers} loader workers; use more shards or data.resampled")
            good_before = counters.read - counters.bad
            for slot in range(slot, len(shards)):
                url = s.urls[shards[slot]]
                for read, key, data in self._samples(shards[slot], skip, counters):
                    try:
                        img = decode_image(data, s.channels, s.resolution)
                    except Exception as exn:  # corrupt image, or not the dataset's size / mode: skip and count
                        counters.failure(f"image {key}", url, exn)
                        continue
                    counters.good()
                    block.append(img)
                    if len(block) == s.shuffle_buffer:
                        yield start, block
                        block, start = [], (epoch, slot, read)
                skip = 0
            if counters.read - counters.bad == good_before and counters.bad:
                raise RuntimeError(f"rank {s.rank} worker {worker}: every shard of epoch {epoch} failed "
                                   f"(last error: {counters.last_error}); check the storage URL and credentials")
            epoch, slot = epoch + 1, 0

    def _samples(self, shard: int, skip: int, counters: _Counters):
        """(samples read in the shard, key, image bytes) from sample `skip` on. A shard that
        fails (after its retries) or ends early loses the samples the manifest lists for it
        that were not read: they are counted as bad, and the stream goes on with the next."""
        s = self.spec
        url, expected = s.urls[shard], (s.counts[shard] if s.counts else None)
        read = skip
        try:
            for index, key, data in _read_shard(url, s.storage_options, skip, s.shard_retries, s.retry_wait):
                read = index + 1
                yield read, key, data
        except Exception as exn:  # missing, denied, corrupt, truncated, or still failing after the retries
            counters.failure("shard", url, f"{_describe(exn)} after {read} samples",
                             1 if expected is None else max(0, expected - read))
            return
        if expected is not None and read < expected:
            counters.failure("shard", url, f"it ended after {read} of the {expected} samples the manifest lists",
                             expected - read)

    def _collate(self, batch: list[np.ndarray], rng) -> torch.Tensor:
        x = np.stack(batch)
        if self.spec.random_flip:
            flip = rng.random(len(x)) < 0.5
            x[flip] = x[flip][..., ::-1]
        if self.spec.binarize:  # dynamic binarization, p = intensity
            x = binarize_pixels(x, rng)
        return torch.from_numpy(np.ascontiguousarray(x))


class EvalStream(IterableDataset):
    """Exact pass: (images, keys) batches; shard i belongs to rank i % world. Nothing is
    skipped: a shard still unreadable after its retries, or an image that is corrupt or not
    the dataset's size / mode, is a ValueError naming the shard URL (and the image's key)."""

    def __init__(self, urls: list[str], channels: int, batch_size: int, rank: int = 0, world: int = 1,
                 storage_options: dict | None = None, resolution: int | None = None, shard_retries: int = 3,
                 retry_wait: float = 1.0):
        super().__init__()
        self.urls, self.channels, self.batch_size, self.rank, self.world = urls, channels, batch_size, rank, world
        self.storage_options = storage_options or {}
        self.resolution, self.shard_retries, self.retry_wait = resolution, shard_retries, retry_wait

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        mine = list(range(self.rank, len(self.urls), self.world))[worker::workers]
        images, keys = [], []
        for i in mine:
            url = self.urls[i]
            for _, key, data in _named(url, _read_shard(url, self.storage_options, 0, self.shard_retries,
                                                        self.retry_wait)):
                try:
                    images.append(decode_image(data, self.channels, self.resolution))
                except Exception as exn:  # an exact pass has no skipping: name the image
                    raise ValueError(redact(f"{url}: sample {key}: {exn}")) from None
                keys.append(key)
                if len(images) == self.batch_size:
                    yield torch.from_numpy(np.stack(images)), keys
                    images, keys = [], []
        if images:
            yield torch.from_numpy(np.stack(images)), keys


def _named(url: str, samples):
    """An exact pass cannot skip a shard: its read errors (after the retries) become one
    ValueError naming the shard URL (without credentials)."""
    try:
        yield from samples
    except Exception as exn:
        raise ValueError(redact(f"{url}: shard unreadable in an exact pass: {_describe(exn)}")) from None


class TrainLoader:
    """DataLoader over ShardStream that remembers every worker's read pointer."""

    def __init__(self, spec: StreamSpec, num_workers: int = 1, pin_memory: bool = False):
        self.spec, self.num_workers = spec, num_workers
        same_readers = spec.workers == max(1, num_workers)
        self.pointers = {int(k): list(v) for k, v in spec.pointers.items()} if same_readers else {}
        self.next_reader = spec.rotation if same_readers else 0
        self.bad = {}
        spec.pointers, spec.workers, spec.rotation = dict(self.pointers), max(1, num_workers), self.next_reader
        # its own generator: creating the iterator must not draw from the global torch RNG,
        # or a resumed run's latent noise would differ from the uninterrupted run's
        generator = torch.Generator().manual_seed(spec.seed)
        self._loader = DataLoader(ShardStream(spec), batch_size=None, num_workers=num_workers,
                                  pin_memory=pin_memory, persistent_workers=False, generator=generator,
                                  multiprocessing_context="spawn" if num_workers else None)
        self._it = None

    def __iter__(self):
        return self

    def __next__(self) -> torch.Tensor:
        if self._it is None:
            self._it = iter(self._loader)
        images, (reader, epoch, slot, read, emitted, bad) = next(self._it)
        self.pointers[int(reader)] = [int(epoch), int(slot), int(read), int(emitted)]
        self.bad[int(reader)] = int(bad)
        self.next_reader = (int(reader) + 1) % max(1, self.num_workers)
        return images

    def close(self) -> None:
        """Stop the worker processes now rather than at garbage collection."""
        if self._it is not None and hasattr(self._it, "_shutdown_workers"):
            try:
                self._it._shutdown_workers()
            except RuntimeError as e:  # a worker that dies while exiting has already stopped
                log.warning("loader worker exited abnormally during shutdown: %s", e)
        self._it = None

    @property
    def bad_samples(self) -> int:
        return sum(self.bad.values())

    def state_dict(self) -> dict:
        return {"workers": max(1, self.num_workers), "next": self.next_reader,
                "pointers": {str(k): v for k, v in self.pointers.items()}}


def split_urls(url: str, split: str, storage_options: dict | None = None):
    """(shard URLs of a split, manifest) for a dataset URL."""
    manifest = read_manifest(url, storage_options)
    shards = manifest.shards_of(split)
    if not shards:
        raise ValueError(redact(f"{url}: no shards for split {split!r} (splits: {', '.join(manifest.splits)})"))
    base = url if "://" in url else f"file://{os.path.abspath(url)}"
    return [join(base, s.name) for s in shards], manifest


def train_loader(url: str, batch_size: int, *, seed: int = 0, rank: int = 0, world: int = 1,
                 shuffle_buffer: int = 1000, random_flip: bool = False, binarize: bool = False,
                 resampled: bool = False, max_bad_fraction: float = 0.01, num_workers: int = 1,
                 pin_memory: bool = False, state: dict | None = None, split: str = "train",
                 storage_options: dict | None = None, shard_retries: int = 3,
                 shard_retry_wait: float = 1.0) -> TrainLoader:
    urls, manifest = split_urls(url, split, storage_options)
    state = state or {}
    spec = StreamSpec(urls, manifest.channels, batch_size, seed=seed, rank=rank, world=world,
                      shuffle_buffer=shuffle_buffer, random_flip=random_flip, binarize=binarize, resampled=resampled,
                      max_bad_fraction=max_bad_fraction,
                      pointers={int(k): v for k, v in state.get("pointers", {}).items()},
                      workers=int(state.get("workers", max(1, num_workers))),
                      rotation=int(state.get("next", 0)), storage_options=dict(storage_options or {}),
                      resolution=manifest.resolution, counts=[s.samples for s in manifest.shards_of(split)],
                      shard_retries=shard_retries, retry_wait=shard_retry_wait)
    return TrainLoader(spec, num_workers, pin_memory)


def eval_loader(url: str, split: str, batch_size: int, *, rank: int = 0, world: int = 1, num_workers: int = 1,
                storage_options: dict | None = None, shard_retries: int = 3, shard_retry_wait: float = 1.0):
    urls, manifest = split_urls(url, split, storage_options)
    stream = EvalStream(urls, manifest.channels, batch_size, rank, world, storage_options,
                        resolution=manifest.resolution, shard_retries=shard_retries, retry_wait=shard_retry_wait)
    return DataLoader(stream, batch_size=None, num_workers=num_workers,
                      multiprocessing_context="spawn" if num_workers else None)
