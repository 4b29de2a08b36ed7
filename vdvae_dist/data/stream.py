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
into samples by webdataset's tar iterators. Corrupt images and unreadable or truncated
shards are skipped, counted and logged with the shard URL; a worker fails once more than
`max_bad_fraction` of what it read was bad.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import fsspec
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .format import IMAGE_EXTS, binarize_pixels, decode_image
from .shardwriter import read_manifest
from ..artifacts.storage import join

log = logging.getLogger(__name__)
_MIN_READ_BEFORE_FAILING = 64


def _iter_shard(url: str, on_error, storage_options: dict | None = None):
    """(key, image bytes) of one tar shard, in order, via webdataset's tar iterators on an
    fsspec stream (so explicit storage options reach the filesystem)."""
    from webdataset.tariterators import group_by_keys, tar_file_expander

    opened = []

    def source():
        try:
            opened.append(fsspec.open(url, "rb", **(storage_options or {})).open())
        except Exception as exn:  # missing or unreadable shard: the handler counts it
            if on_error(exn):
                return
            raise
        yield {"url": url, "stream": opened[0]}

    try:
        for sample in group_by_keys(tar_file_expander(source(), handler=on_error), handler=on_error):
            data = next((sample[ext] for ext in IMAGE_EXTS if ext in sample), None)
            if data is not None:
                yield sample["__key__"], data
    finally:
        for stream in opened:
            stream.close()


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


class _Counters:
    def __init__(self, spec: StreamSpec):
        self.spec, self.read, self.bad, self.last_error = spec, 0, 0, ""

    def good(self) -> None:
        self.read += 1

    def failure(self, what: str, url: str, exn: BaseException) -> None:
        self.read += 1
        self.bad += 1
        self.last_error = f"{what} in {url}: {exn}"
        log.warning("skipped %s in %s: %s (%d bad of %d read)", what, url, exn, self.bad, self.read)
        if self.read >= _MIN_READ_BEFORE_FAILING and self.bad > self.spec.max_bad_fraction * self.read:
            raise RuntimeError(f"{self.bad} of {self.read} samples/shards read were bad (last: {what} in {url}); "
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
                read = 0
                for key, data in self._samples(url, counters):
                    read += 1
                    if read <= skip:
                        continue
                    try:
                        img = decode_image(data, s.channels)
                    except Exception as exn:  # corrupt image: skip and count
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

    def _samples(self, url: str, counters: _Counters):
        def on_error(exn):  # unreadable or truncated shard: count it, go on with the next one
            counters.failure("shard", url, exn)
            return True

        yield from _iter_shard(url, on_error, self.spec.storage_options)

    def _collate(self, batch: list[np.ndarray], rng) -> torch.Tensor:
        x = np.stack(batch)
        if self.spec.random_flip:
            flip = rng.random(len(x)) < 0.5
            x[flip] = x[flip][..., ::-1]
        if self.spec.binarize:  # dynamic binarization, p = intensity
            x = binarize_pixels(x, rng)
        return torch.from_numpy(np.ascontiguousarray(x))


class EvalStream(IterableDataset):
    """Exact pass: (images, keys) batches; shard i belongs to rank i % world."""

    def __init__(self, urls: list[str], channels: int, batch_size: int, rank: int = 0, world: int = 1,
                 storage_options: dict | None = None):
        super().__init__()
        self.urls, self.channels, self.batch_size, self.rank, self.world = urls, channels, batch_size, rank, world
        self.storage_options = storage_options or {}

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        mine = list(range(self.rank, len(self.urls), self.world))[worker::workers]
        images, keys = [], []
        for i in mine:
            for key, data in _iter_shard(self.urls[i], _reraise, self.storage_options):
                images.append(decode_image(data, self.channels))
                keys.append(key)
                if len(images) == self.batch_size:
                    yield torch.from_numpy(np.stack(images)), keys
                    images, keys = [], []
        if images:
            yield torch.from_numpy(np.stack(images)), keys


def _reraise(exn):
    raise exn


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
        raise ValueError(f"{url}: no shards for split {split!r} (splits: {', '.join(manifest.splits)})")
    base = url if "://" in url else f"file://{os.path.abspath(url)}"
    return [join(base, s.name) for s in shards], manifest


def train_loader(url: str, batch_size: int, *, seed: int = 0, rank: int = 0, world: int = 1,
                 shuffle_buffer: int = 1000, random_flip: bool = False, binarize: bool = False,
                 resampled: bool = False, max_bad_fraction: float = 0.01, num_workers: int = 1,
                 pin_memory: bool = False, state: dict | None = None, split: str = "train",
                 storage_options: dict | None = None) -> TrainLoader:
    urls, manifest = split_urls(url, split, storage_options)
    state = state or {}
    spec = StreamSpec(urls, manifest.channels, batch_size, seed, rank, world, shuffle_buffer, random_flip,
                      binarize, resampled, max_bad_fraction,
                      pointers={int(k): v for k, v in state.get("pointers", {}).items()},
                      workers=int(state.get("workers", max(1, num_workers))),
                      rotation=int(state.get("next", 0)), storage_options=dict(storage_options or {}))
    return TrainLoader(spec, num_workers, pin_memory)


def eval_loader(url: str, split: str, batch_size: int, *, rank: int = 0, world: int = 1, num_workers: int = 1,
                storage_options: dict | None = None):
    urls, manifest = split_urls(url, split, storage_options)
    stream = EvalStream(urls, manifest.channels, batch_size, rank, world, storage_options)
    return DataLoader(stream, batch_size=None, num_workers=num_workers,
                      multiprocessing_context="spawn" if num_workers else None)
