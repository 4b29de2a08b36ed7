"""What the trainers see of the data: an endless, checkpointable iterator of uint8
training batches and an exact evaluation pass, from shards or from memory. Reading only:
shards are built beforehand by the drivers (shardwriter.ensure_shards)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Iterator

import numpy as np
import torch

from ..artifacts.storage import redact
from .batches import MemoryBatches, Position, eval_batches
from .format import binarize_pixels
from .manifest import read_manifest
from .sources import load_images, split, validate_source

if TYPE_CHECKING:
    from ..config.schema import DataConfig


class TrainingData:
    def __init__(self, batches, eval_fn, n_eval: int, eval_split: str, description: str, kind: str):
        self._batches, self._eval_fn = batches, eval_fn
        self.n_eval, self.eval_split, self.description, self.kind = n_eval, eval_split, description, kind

    def __iter__(self) -> Iterator[torch.Tensor]:
        return self

    def __next__(self) -> torch.Tensor:
        b = next(self._batches)
        return b if isinstance(b, torch.Tensor) else torch.from_numpy(b)

    def eval_pass(self, batch_size: int) -> Iterator[torch.Tensor]:
        return self._eval_fn(batch_size)

    def state_dict(self) -> dict:
        pos = self._batches.position.state_dict() if self.kind == "memory" else self._batches.state_dict()
        return {"kind": self.kind, **pos}

    @property
    def bad_samples(self) -> int:
        return getattr(self._batches, "bad_samples", 0)


def binarized_for_evaluation(batches, binarize: bool, seed: int = 1):
    """Held-out uint8 batches as the model is scored on them: with data.binarize, each
    pixel is 1 with probability intensity/255, from a fixed seed per evaluating process."""
    rng = np.random.default_rng(seed)  # fixed: the evaluation pass sees the same binary images every time
    for b in batches:
        if binarize:
            b = torch.from_numpy(binarize_pixels(b.numpy(), rng))
        yield b


def open_training_data(d: DataConfig, batch_size: int, seed: int, *, rank: int = 0, world: int = 1,
                       state: dict | None = None, pin_memory: bool = False, log=print) -> TrainingData:
    state = dict(state or {})
    kind = "shards" if d.shards else "memory"
    if kind == "memory" or d.source:  # with shards already built, the source may be empty
        validate_source(d.source)
    if state and state.get("kind") != kind:
        log(f"ignoring the saved data position (it belongs to a {state.get('kind')} source)")
        state = {}
    if kind == "memory":
        images = load_images(d, seed=seed)
        train, held_out = split(images, d.val_fraction, seed=seed, keep_order=d.order == "sequential")
        # each rank its own disjoint share, as the shard streams split by rank
        mine, my_held_out = train[rank::world], held_out[rank::world]
        position = Position(state["epoch"], state["index"]) if state else None
        stream = MemoryBatches(mine, batch_size, seed, d.random_flip, d.binarize, position, d.order == "sequential")

        def eval_fn(bs):
            return binarized_for_evaluation((torch.from_numpy(b) for b in eval_batches(my_held_out, bs)), d.binarize)

        return TrainingData(stream, eval_fn, len(held_out), "held-out",
                            f"{len(train)} train / {len(held_out)} held-out images in memory", kind)

    from .stream import eval_loader, train_loader  # torch DataLoader machinery only when streaming

    manifest = read_manifest(d.shards, d.storage_options)  # built beforehand by the driver (shardwriter.ensure_shards)
    eval_split = "test" if manifest.splits.get("test") else "val"
    loader = train_loader(d.shards, batch_size, seed=seed, rank=rank, world=world, shuffle_buffer=d.shuffle_buffer,
                          random_flip=d.random_flip, binarize=d.binarize, resampled=d.resampled,
                          max_bad_fraction=d.max_bad_fraction, num_workers=d.loader_workers,
                          pin_memory=pin_memory, state=state, shard_retries=d.shard_retries,
                          shard_retry_wait=d.shard_retry_wait, storage_options=d.storage_options)

    def eval_fn(bs):
        batches = (images for images, _ in eval_loader(d.shards, eval_split, bs, rank=rank, world=world,
                                                      num_workers=min(1, d.loader_workers),
                                                      shard_retries=d.shard_retries,
                                                      shard_retry_wait=d.shard_retry_wait,
                                                      storage_options=d.storage_options))
        return binarized_for_evaluation(batches, d.binarize)

    n_train = manifest.splits.get("train", 0)
    description = (f"{n_train} train / {manifest.splits[eval_split]} {eval_split} images streamed from {d.shards} "
                   f"({len(manifest.shards)} shards, {max(0, d.loader_workers)} loader workers)")
    return TrainingData(loader, eval_fn, manifest.splits[eval_split], eval_split, redact(description), kind)

