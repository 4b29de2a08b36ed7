"""What every image model in this package offers (VDVAE and AEVB alike): the per-image
ELBO terms, and the argument checks of sampling shared by both."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol, Sequence

import torch


def bits_per_dim(nats_per_image, dims: int):
    """Nats per image -> bits per data dimension (floats or tensors)."""
    return nats_per_image / (dims * math.log(2.0))


@dataclass
class Elbo:
    """Per-image terms of the negative ELBO, in nats (fp32)."""

    nelbo: torch.Tensor  # (N,) reconstruction + total KL
    recon: torch.Tensor  # (N,) -log p(x | z)
    kl: torch.Tensor  # (G, N) KL of every latent group
    dims: int  # data dimensions per image (padding excluded)
    kl_channels: list[torch.Tensor] | None = None  # per group (N, Z), summed over H, W

    def bits_per_dim(self) -> torch.Tensor:
        return bits_per_dim(self.nelbo, self.dims)


class ImageModel(Protocol):
    """The interface training, evaluation and serving rely on."""

    config: object  # the ModelConfig it was built from
    data_shape: tuple[int, int, int]  # (C, H, W) of the uint8 images it models
    group_shapes: list[tuple[int, int, int]]  # (Z, H, W) of every latent group

    @property
    def num_groups(self) -> int: ...

    def __call__(self, x_uint8: torch.Tensor, stats: bool = False, noise=None, posterior=None) -> Elbo: ...

    def importance_log_weights(self, x_uint8: torch.Tensor, samples: int, noise=None) -> torch.Tensor: ...

    def sample(self, n: int, temperature: float | Sequence[float] = 1.0,
               seed: int | None = None, probabilities: bool = False) -> torch.Tensor: ...

    def sample_batch(self, requests: Sequence[tuple[int, float | Sequence[float], int | None]]) -> list[torch.Tensor]: ...

    def reconstruct(self, x_uint8: torch.Tensor, depth: int, temperature: float | Sequence[float] = 1.0,
                    seed: int | None = None, probabilities: bool = False) -> torch.Tensor: ...


def sampling_temperatures(temperature: float | Sequence[float], groups: int) -> list[float]:
    if isinstance(temperature, (int, float)):
        temps = [float(temperature)] * groups
    else:
        temps = [float(t) for t in temperature]
        if len(temps) != groups:
            raise ValueError(f"temperature has {len(temps)} values; allowed: one float or exactly {groups} (one per latent group)")
    bad = [t for t in temps if not (t >= 0 and math.isfinite(t))]
    if bad:
        raise ValueError(f"temperature={bad[0]!r} is out of range; allowed: >= 0")
    return temps


def seeded_generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    if seed is None:
        return None
    g = torch.Generator(device=device)
    g.manual_seed(int(seed))
    return g
