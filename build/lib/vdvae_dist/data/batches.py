"""In-memory batch stream with a resumable position (epoch, index)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .format import binarize_pixels


@dataclass
class Position:
    epoch: int = 0
    index: int = 0  # images of this epoch already served

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}


class MemoryBatches:
    """Endless batches of in-memory images; each epoch has its own permutation derived from
    the seed (or none: `sequential`), so (seed, epoch, index) pins the exact next batch
    after a resume."""

    def __init__(self, images: np.ndarray, batch_size: int, seed: int, random_flip: bool, binarize: bool,
                 position: Position | None = None, sequential: bool = False):
        if len(images) < batch_size:
            raise ValueError(f"optim.batch_size={batch_size} is out of range; allowed: <= {len(images)} "
                             "(the number of training images)")
        self.images, self.batch_size, self.seed = images, batch_size, seed
        self.random_flip, self.binarize, self.sequential = random_flip, binarize, sequential
        self.position = position or Position()

    def _order(self, epoch: int) -> np.ndarray:
        if self.sequential:  # data.order = sequential: file order, every epoch
            return np.arange(len(self.images))
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.images))

    def __iter__(self):
        return self

    def __next__(self) -> np.ndarray:
        pos = self.position
        if pos.index + self.batch_size > len(self.images):  # drop the ragged tail
            pos.epoch, pos.index = pos.epoch + 1, 0
        idx = self._order(pos.epoch)[pos.index : pos.index + self.batch_size]
        rng = np.random.default_rng([self.seed, pos.epoch, pos.index, 1])
        pos.index += self.batch_size
        batch = self.images[idx]
        if self.random_flip:
            flip = rng.random(len(batch)) < 0.5
            batch = np.where(flip[:, None, None, None], batch[..., ::-1], batch)
        if self.binarize:  # dynamic binarization, p = intensity
            batch = binarize_pixels(batch, rng)
        return np.ascontiguousarray(batch)


def eval_batches(images: np.ndarray, batch_size: int):
    """One exact pass: every image once, the last batch possibly smaller."""
    for start in range(0, len(images), batch_size):
        yield images[start : start + batch_size]
