"""Diagonal Gaussian latents: parameterisation, reparameterised samples and analytic KL."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def gaussian_params(stats_B2ZHW: torch.Tensor, design: str, softplus_beta: float):
    """Split 2Z channels into (mean, std), both fp32.

    Efficient: std = softplus_beta(raw) ("gradient smoothing"); original: std = exp(log_std).
    """
    mean, raw = stats_B2ZHW.float().chunk(2, dim=1)
    if design == "efficient":
        std = F.softplus(raw, beta=softplus_beta).clamp_min(1e-7)
    else:
        std = torch.exp(raw)
    return mean, std


def gaussian_kl(q_mean, q_std, p_mean, p_std) -> torch.Tensor:
    """Elementwise KL(q || p) of diagonal Gaussians in nats."""
    var_ratio = (q_std / p_std) ** 2
    mean_term = ((q_mean - p_mean) / p_std) ** 2
    return 0.5 * (var_ratio + mean_term - 1.0) - torch.log(q_std / p_std)


def gaussian_log_ratio(z, q_mean, q_std, p_mean, p_std) -> torch.Tensor:
    """Elementwise log q(z) - log p(z) of diagonal Gaussians at a drawn z, in nats: the
    one-sample KL estimate an importance weight needs (its mean over z is gaussian_kl)."""
    q_eps = (z - q_mean) / q_std
    p_eps = (z - p_mean) / p_std
    return 0.5 * (p_eps**2 - q_eps**2) - torch.log(q_std / p_std)


class RowNoise:
    """Random draws for a batch assembled from several requests: the rows of each request
    come from that request's own generator, drawn in one piece, so its images do not depend
    on what it was batched with (one part of n rows draws exactly what a plain generator would)."""

    def __init__(self, parts: list[tuple[int, torch.Generator]]):
        self.parts = parts

    @classmethod
    def seeded(cls, sizes: list[int], seeds: list[int | None], device: torch.device) -> "RowNoise":
        parts = []
        for n, seed in zip(sizes, seeds):
            g = torch.Generator(device=device)
            g.manual_seed(int(seed)) if seed is not None else g.seed()
            parts.append((n, g))
        return cls(parts)

    def draw(self, fn, shape, device, dtype) -> torch.Tensor:
        return torch.cat([fn((n, *shape[1:]), generator=g, device=device, dtype=dtype) for n, g in self.parts])


class ZeroNoise:
    """Every draw is zero: each latent equals its distribution's mean (the official codes'
    zero-noise reference protocol; deterministic reconstructions)."""

    def draw(self, fn, shape, device, dtype) -> torch.Tensor:
        return torch.zeros(shape, device=device, dtype=dtype)


ZERO_NOISE = ZeroNoise()
Noise = torch.Generator | RowNoise | ZeroNoise | None


def randn(shape, noise: Noise, device, dtype=torch.float32) -> torch.Tensor:
    if isinstance(noise, (RowNoise, ZeroNoise)):
        return noise.draw(torch.randn, shape, device, dtype)
    return torch.randn(shape, generator=noise, device=device, dtype=dtype)


def rand(shape, noise: Noise, device, dtype=torch.float32) -> torch.Tensor:
    if isinstance(noise, ZeroNoise):
        raise ValueError("zero noise only applies to Gaussian latents, not to uniform draws")
    if isinstance(noise, RowNoise):
        return noise.draw(torch.rand, shape, device, dtype)
    return torch.rand(shape, generator=noise, device=device, dtype=dtype)


def reparameterize(mean, std, temperature: float | torch.Tensor = 1.0, noise: Noise = None):
    """z = mean + std * eps * temperature; a tensor temperature holds one value per row."""
    eps = randn(mean.shape, noise, mean.device, mean.dtype)
    if isinstance(temperature, torch.Tensor):
        temperature = temperature.to(mean.dtype).view(-1, *([1] * (mean.dim() - 1)))
    return mean + std * (eps * temperature)


@dataclass
class LatentChoice:
    """How an evaluation pass draws one group's posterior latents.

    `keep` (Z,) bool: channels taken from the posterior; the others come from the prior and
    add no KL (the variational distribution is the prior there, so the ELBO stays a bound).
    `sampled`: return log q(z) - log p(z) at the drawn z instead of the analytic KL, the
    term an importance weight needs."""

    keep: torch.Tensor | None = None
    sampled: bool = False

    def apply(self, z, q_mean, q_std, p_mean, p_std, noise: Noise):
        """(z, kl term), both shaped like z."""
        if self.keep is not None:
            keep = self.keep.to(z.device).view(1, -1, *([1] * (z.dim() - 2)))
            z = torch.where(keep, z, reparameterize(p_mean, p_std, 1.0, noise))
            q_mean, q_std = torch.where(keep, q_mean, p_mean), torch.where(keep, q_std, p_std)
        if self.sampled:
            return z, gaussian_log_ratio(z, q_mean, q_std, p_mean, p_std)
        return z, gaussian_kl(q_mean, q_std, p_mean, p_std)
