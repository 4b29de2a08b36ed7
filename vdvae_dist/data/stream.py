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

Shards are opened with fsspec (explicit storage options reach the filesystem; s3://, gs://,
http(s)://, file:// and bare paths) and read as plain tar streams within fixed bounds
(shardread.py: no decompression, a per-member size cap, PNG/JPEG only, the manifest's
size and SHA-256 checked as the bytes pass). A transient storage error (a reset
connection, a timeout, a server error the storage client's own retries did not get past)
reopens the shard up to `shard_retries` times in a row, after `retry_wait`, 2 x
`retry_wait`, ... seconds, and the read continues after the last sample it gave out, so the
stream (and an exact resume) is the same as without the error.

Bad data is skipped, counted in samples and logged with the shard URL: a corrupt image, or
one whose size or mode is not the dataset's, counts one; a shard that is missing, denied,
corrupt, truncated or still failing after its retries counts the samples of it the
manifest lists and that were not read; a shard whose bytes are not the manifest's counts
all of its samples. The bad fraction is judged over the run's whole shard list (one pass
over the split, from the manifest): the loader lists the dataset once at the start and
fails at once when the shards missing (or of another size) hold more than
`max_bad_fraction` of the split, else skips them; a reader fails once those plus the
samples it lost itself in the current epoch exceed that fraction (_Counters). URLs are
shown with any user:password part removed.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .format import binarize_pixels, decode_image, member_cap
from .manifest import MANIFEST, ShardInfo, read_manifest
from .shardread import ShardMismatch, describe as _describe, read_shard, transient  # noqa: F401 (transient: API)
from ..artifacts.storage import join, redact, to_fs

log = logging.getLogger(__name__)
_MIN_READ_BEFORE_FAILING = 64


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
    sizes: list[int] = field(default_factory=list)  # bytes per shard (manifest); []: not checked
    hashes: list[str] = field(default_factory=list)  # SHA-256 per shard (manifest); []: not checked
    known_bad: frozenset = frozenset()  # shards missing or of another size when the loader started


def _bounds(s, shard: int) -> dict:
    """read_shard's limits for one shard of a stream: member cap, manifest size and hash."""
    return {"cap": member_cap(s.resolution, s.channels), "size": s.sizes[shard] if s.sizes else None,
            "sha256": s.hashes[shard] if s.hashes else ""}


class _Counters:
    """One reader's tally of bad samples, and the judgement on it.

    The judgement is over the run's whole shard list, not over what this reader happened
    to read so far: with the split's sample count known (the manifest), the reader fails
    once `known` (the samples of the shards that were missing or of the wrong size when the
    loader started, a run-wide fact) plus the samples it lost itself in this epoch exceed
    max_bad_fraction of one pass over the split. Both are certainly lost in this epoch, so
    the rule never fires while the run as a whole is within the fraction, whatever the
    number of readers or where in its order a reader meets a bad shard (with `resampled`, a
    reader may draw one bad shard twice in an epoch and count it twice). Without counts (a
    bare StreamSpec), the fraction is of the samples this reader read."""

    def __init__(self, spec: StreamSpec):
        self.spec, self.read, self.bad, self.last_error = spec, 0, 0, ""
        self.total = sum(spec.counts) if spec.counts else None  # samples of one pass over the split
        self.known = sum(spec.counts[i] for i in spec.known_bad) if spec.counts else 0
        self.epoch_bad = 0  # lost by this reader in this epoch, outside the known-bad shards
        self.shard_good = self.shard_bad = 0  # of the current shard

    def new_epoch(self) -> None:
        self.epoch_bad = 0

    def new_shard(self) -> None:
        self.shard_good = self.shard_bad = 0

    def good(self) -> None:
        self.read += 1
        self.shard_good += 1

    def failure(self, what: str, url: str, exn: BaseException | str, samples: int = 1, *,
                already_read: int = 0, judged: bool = True) -> None:
        """`samples` samples lost to one fault (a bad image: 1; a shard: its samples not
        read, or all of it on a hash mismatch), of which `already_read` were counted as read
        (good) before; `judged=False`: a shard already judged as missing at the start."""
        self.read += samples - already_read
        self.bad += samples
        self.shard_bad += samples
        self.epoch_bad += samples if judged else 0
        self.last_error = redact(f"{what} in {url}: {exn}")
        log.warning("%s", redact(f"skipped {what} in {url}: {exn} ({samples} sample(s) lost; "
                                 f"{self.bad} bad of {self.read} samples read)"))
        f = self.spec.max_bad_fraction
        if self.total is not None:
            lost = self.known + self.epoch_bad
            if lost > f * self.total:
                raise RuntimeError(f"{lost} of the {self.total} samples of one pass over the split are lost "
                                   f"({self.known} in shards missing when the loader started, {self.epoch_bad} "
                                   f"lost by this reader in this epoch; last: {self.last_error}); more than "
                                   f"data.max_bad_fraction={f}")
        elif self.read >= _MIN_READ_BEFORE_FAILING and self.bad > f * self.read:
            raise RuntimeError(f"{self.bad} of {self.read} samples read were bad (last: {self.last_error}); "
                               f"more than data.max_bad_fraction={f}")


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
            counters.new_epoch()
            for slot in range(slot, len(shards)):
                url = s.urls[shards[slot]]
                counters.new_shard()
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
            if counters.read - counters.bad <= good_before and counters.bad:
                raise RuntimeError(f"rank {s.rank} worker {worker}: every shard of epoch {epoch} failed "
                                   f"(last error: {counters.last_error}); check the storage URL and credentials")
            epoch, slot = epoch + 1, 0

    def _samples(self, shard: int, skip: int, counters: _Counters):
        """(samples read in the shard, key, image bytes) from sample `skip` on. A shard that
        fails (after its retries) or ends early loses the samples the manifest lists for it
        that were not read: they are counted as bad, and the stream goes on with the next.
        A shard whose bytes are not the manifest's (SHA-256, size) loses all of its samples,
        those already given out included; one missing when the loader started is not opened."""
        s = self.spec
        url, expected = s.urls[shard], (s.counts[shard] if s.counts else None)
        if shard in s.known_bad:
            counters.failure("shard", url, "missing, or not the size the manifest lists, when the loader started",
                             max(0, (expected or 1) - skip), judged=False)
            return
        read = skip
        try:
            for index, key, data in read_shard(url, s.storage_options, skip, s.shard_retries, s.retry_wait,
                                               **_bounds(s, shard)):
                read = index + 1
                yield read, key, data
        except ShardMismatch as exn:  # given out already; the whole shard counts as bad
            seen = counters.shard_good + counters.shard_bad
            counters.failure("shard", url, _describe(exn), max(seen, (expected or 0) - skip) - counters.shard_bad,
                             already_read=counters.shard_good)
            return
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
                 retry_wait: float = 1.0, sizes: list[int] | None = None, hashes: list[str] | None = None):
        super().__init__()
        self.urls, self.channels, self.batch_size, self.rank, self.world = urls, channels, batch_size, rank, world
        self.storage_options = storage_options or {}
        self.resolution, self.shard_retries, self.retry_wait = resolution, shard_retries, retry_wait
        self.sizes, self.hashes = list(sizes or []), list(hashes or [])

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        mine = list(range(self.rank, len(self.urls), self.world))[worker::workers]
        images, keys = [], []
        for i in mine:
            url = self.urls[i]
            for _, key, data in _named(url, read_shard(url, self.storage_options, 0, self.shard_retries,
                                                       self.retry_wait, **_bounds(self, i))):
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
    """An exact pass cannot skip a shard: its read errors (after the retries), and bytes that
    are not the manifest's, become one ValueError naming the shard URL (without credentials)."""
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


def absent_shards(url: str, shards: list[ShardInfo], storage_options: dict | None = None) -> list[int] | None:
    """Indexes of the shards that are missing, or not the size the manifest lists, from one
    listing of the dataset's folder; None when it cannot be listed (no list permission, an
    HTTP server without an index page) or the listing lacks the manifest itself."""
    try:
        fs, root = to_fs(url, storage_options)
        fs.invalidate_cache(root)  # a listing cached by an earlier attempt in this process may be stale
        listed = {str(e["name"]).rstrip("/").rsplit("/", 1)[-1]: e.get("size") for e in fs.ls(root, detail=True)}
    except Exception as exn:  # the streams still judge every shard as they read it
        log.info("%s", redact(f"{url}: not listed ({_describe(exn)}); shards are checked as they are read"))
        return None
    if MANIFEST not in listed:
        return None
    return [i for i, s in enumerate(shards)
            if s.name not in listed or (listed[s.name] is not None and listed[s.name] != s.bytes)]


def _known_bad(url: str, split: str, shards: list[ShardInfo], max_bad_fraction: float,
               storage_options: dict | None) -> frozenset:
    """The split's shards missing at the start: a RuntimeError when they alone hold more
    than max_bad_fraction of the split's samples (the run could not stay within it), else
    a warning naming them; the streams skip them and count their samples as bad."""
    absent = absent_shards(url, shards, storage_options) or []
    if not absent:
        return frozenset()
    lost, total = sum(shards[i].samples for i in absent), sum(s.samples for s in shards)
    names = ", ".join(shards[i].name for i in absent[:10]) + (", ..." if len(absent) > 10 else "")
    what = (f"{url}: {len(absent)} of the {len(shards)} {split} shards are missing or not the size the "
            f"manifest lists ({lost} of {total} samples): {names}")
    if lost > max_bad_fraction * total:
        raise RuntimeError(redact(f"{what}; more than data.max_bad_fraction={max_bad_fraction}"))
    log.warning("%s", redact(f"{what}; within data.max_bad_fraction={max_bad_fraction}, they are skipped"))
    return frozenset(absent)


def train_loader(url: str, batch_size: int, *, seed: int = 0, rank: int = 0, world: int = 1,
                 shuffle_buffer: int = 1000, random_flip: bool = False, binarize: bool = False,
                 resampled: bool = False, max_bad_fraction: float = 0.01, num_workers: int = 1,
                 pin_memory: bool = False, state: dict | None = None, split: str = "train",
                 storage_options: dict | None = None, shard_retries: int = 3,
                 shard_retry_wait: float = 1.0) -> TrainLoader:
    urls, manifest = split_urls(url, split, storage_options)
    shards = manifest.shards_of(split)
    state = state or {}
    spec = StreamSpec(urls, manifest.channels, batch_size, seed=seed, rank=rank, world=world,
                      shuffle_buffer=shuffle_buffer, random_flip=random_flip, binarize=binarize, resampled=resampled,
                      max_bad_fraction=max_bad_fraction,
                      pointers={int(k): v for k, v in state.get("pointers", {}).items()},
                      workers=int(state.get("workers", max(1, num_workers))),
                      rotation=int(state.get("next", 0)), storage_options=dict(storage_options or {}),
                      resolution=manifest.resolution, counts=[s.samples for s in shards],
                      shard_retries=shard_retries, retry_wait=shard_retry_wait,
                      sizes=[s.bytes for s in shards], hashes=[s.sha256 for s in shards],
                      known_bad=_known_bad(url, split, shards, max_bad_fraction, storage_options))
    return TrainLoader(spec, num_workers, pin_memory)


def eval_loader(url: str, split: str, batch_size: int, *, rank: int = 0, world: int = 1, num_workers: int = 1,
                storage_options: dict | None = None, shard_retries: int = 3, shard_retry_wait: float = 1.0):
    urls, manifest = split_urls(url, split, storage_options)
    shards = manifest.shards_of(split)
    stream = EvalStream(urls, manifest.channels, batch_size, rank, world, storage_options,
                        resolution=manifest.resolution, shard_retries=shard_retries, retry_wait=shard_retry_wait,
                        sizes=[s.bytes for s in shards], hashes=[s.sha256 for s in shards])
    return DataLoader(stream, batch_size=None, num_workers=num_workers,
                      multiprocessing_context="spawn" if num_workers else None)
