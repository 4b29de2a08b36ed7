"""Latent utilisation: how much of the KL (the information the latents carry) each
group and channel holds, and which channels are "active"."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

# A channel is active when its KL, averaged over images and spatial positions, exceeds this
# (nats per channel-position); the papers' utilisation analyses use the same kind of cut.
ACTIVE_THRESHOLD = 0.01


@dataclass
class Utilisation:
    kl_per_position: list[np.ndarray]  # per group (Z,): mean KL per image and position, nats
    positions: list[int]  # H * W of every group
    threshold: float

    @classmethod
    def from_sums(cls, channel_kl: Sequence[np.ndarray], group_shapes: Sequence[tuple[int, int, int]], images: int,
                  threshold: float = ACTIVE_THRESHOLD) -> "Utilisation":
        """From per-channel KL summed over images and positions (Measures.channel_kl)."""
        if images < 1:
            raise ValueError("latent utilisation needs at least one image")
        positions = [h * w for _, h, w in group_shapes]
        return cls([np.asarray(k, dtype=np.float64) / (images * n) for k, n in zip(channel_kl, positions)],
                   positions, float(threshold))

    @property
    def keep(self) -> list[np.ndarray]:
        """Per group, the active channels (bool)."""
        return [k > self.threshold for k in self.kl_per_position]

    @property
    def kl_per_group(self) -> np.ndarray:
        """Mean KL per image of every group, nats."""
        return np.array([float((k * n).sum()) for k, n in zip(self.kl_per_position, self.positions)])

    @property
    def active_channels(self) -> int:
        return int(sum(k.sum() for k in self.keep))

    @property
    def total_channels(self) -> int:
        return int(sum(k.size for k in self.kl_per_position))

    @property
    def active_fraction(self) -> float:
        return self.active_channels / self.total_channels

    def cumulative_share(self) -> np.ndarray:
        """Share of the total KL (per image) held by the first 1, 2, ... channels, ranked by
        KL per position as "active" is, so the active channels are exactly the first
        `active_channels` of the ranking."""
        per_position = np.concatenate(self.kl_per_position)
        per_image = np.concatenate([k * n for k, n in zip(self.kl_per_position, self.positions)])
        ordered = per_image[np.argsort(-per_position, kind="stable")]
        total = ordered.sum()
        return np.cumsum(ordered) / total if total > 0 else np.zeros_like(ordered)
