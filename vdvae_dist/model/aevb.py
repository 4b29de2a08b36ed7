"""AEVB (Kingma & Welling, 2013): MLP encoder and decoder with one tanh hidden layer, a
Gaussian latent with the reparameterisation trick, and a Bernoulli output for binary
data or a discretized Gaussian (per channel, over the `num_bits` grid) for colour data.
Same interface as the VDVAE: forward -> Elbo, sample, reconstruct (depth 0 or 1)."""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import torch
import torch.nn as nn

from ..config.schema import ModelConfig
from . import likelihoods as lik
from .latent import LatentChoice, Noise, gaussian_kl, reparameterize
from .codec import ImageCodec
from .interface import Elbo, sampling_temperatures, seeded_generator


class AEVB(nn.Module):
    def __init__(self, m: ModelConfig):
        super().__init__()
        self.config = m
        self.codec = ImageCodec(dataclasses.replace(m, pad=0))  # an MLP needs no padding
        side = m.resolution - 2 * m.pad
        self.data_shape = (m.channels, side, side)
        d = m.channels * side * side
        out = d if m.likelihood == "bernoulli" else 2 * d  # (mean, log std) per dimension
        self.encoder = nn.Sequential(nn.Linear(d, m.aevb_hidden), nn.Tanh(), nn.Linear(m.aevb_hidden, 2 * m.aevb_latent))
        self.decoder = nn.Sequential(nn.Linear(m.aevb_latent, m.aevb_hidden), nn.Tanh(), nn.Linear(m.aevb_hidden, out))
        self.group_shapes = [(m.aevb_latent, 1, 1)]

    num_groups = 1

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        n = z.shape[0]
        c, h, w = self.data_shape
        return self.decoder(z).float().view(n, -1, h, w)

    def _log_prob(self, out, targets):
        if self.config.likelihood == "bernoulli":
            return lik.bernoulli_log_prob(out, targets)
        mean, log_std = out.chunk(2, dim=1)
        return discretized_gaussian_log_prob(mean, log_std, targets, self.config.num_bits).sum(1)

    def _sample_output(self, out, gen, probabilities: bool = False):
        if self.config.likelihood == "bernoulli":
            return self.codec.to_uint8(torch.sigmoid(out.float()) if probabilities else
                                       lik.bernoulli_sample(out, generator=gen))
        mean, log_std = out.chunk(2, dim=1)
        noise = torch.randn(mean.shape, generator=gen, device=mean.device)
        return self.codec.to_uint8(lik.quantize(mean + noise * log_std.clamp(-7, 7).exp(), self.config.num_bits))

    def _encode(self, targets):
        x = self.codec.net_input(targets).flatten(1).to(self.encoder[0].weight.dtype)
        mean, log_std = self.encoder(x).float().chunk(2, dim=1)
        return mean, log_std.clamp(-10, 10).exp()

    def forward(self, x_uint8: torch.Tensor, stats: bool = False, noise: Noise = None,
                posterior: Sequence[LatentChoice | None] | None = None) -> Elbo:
        """Negative ELBO per image; `noise` and `posterior` (one LatentChoice) as in VDVAE."""
        targets = self.codec.targets(x_uint8)
        return self._elbo(targets, *self._encode(targets), noise, (posterior or [None])[0], stats)

    def _elbo(self, targets, q_mean, q_std, noise: Noise, choice: LatentChoice | None, stats: bool) -> Elbo:
        z = reparameterize(q_mean, q_std, 1.0, noise)
        p_mean, p_std = torch.zeros_like(q_mean), torch.ones_like(q_std)
        if choice is None:
            kl_NZ = gaussian_kl(q_mean, q_std, p_mean, p_std)
        else:
            z, kl_NZ = choice.apply(z, q_mean, q_std, p_mean, p_std, noise)
        recon = -self._log_prob(self._decode(z.to(self.encoder[0].weight.dtype)), targets).sum(dim=(1, 2))
        kl = kl_NZ.sum(1, keepdim=True).T
        c, h, w = self.data_shape
        return Elbo(recon + kl.sum(0), recon, kl, c * h * w, [kl_NZ] if stats else None)

    @torch.no_grad()
    def importance_log_weights(self, x_uint8: torch.Tensor, samples: int, noise: Noise = None) -> torch.Tensor:
        """(N, samples) of log p(x, z_k) - log q(z_k | x); the encoder runs once."""
        targets = self.codec.targets(x_uint8)
        q = self._encode(targets)
        sampled = LatentChoice(sampled=True)
        return torch.stack([-self._elbo(targets, *q, noise, sampled, False).nelbo for _ in range(samples)], dim=1)

    @torch.no_grad()
    def sample(self, n: int, temperature: float | Sequence[float] = 1.0, seed: int | None = None,
               probabilities: bool = False):
        """probabilities: Bernoulli pixel probabilities as grey levels instead of a draw."""
        if n < 1:
            raise ValueError(f"n={n} is out of range; allowed: >= 1")
        (t,) = sampling_temperatures(temperature, 1)
        gen = seeded_generator(seed, self.encoder[0].weight.device)
        z = torch.randn(n, self.config.aevb_latent, generator=gen, device=self.encoder[0].weight.device) * t
        return self._sample_output(self._decode(z.to(self.encoder[0].weight.dtype)), gen, probabilities)

    @torch.no_grad()
    def sample_batch(self, requests: Sequence[tuple[int, float | Sequence[float], int | None]]) -> list[torch.Tensor]:
        """Several (n, temperature, seed) requests; each gets what `sample` gives alone
        (an MLP this small gains nothing from one fused pass)."""
        if not requests or min(int(n) for n, _, _ in requests) < 1:
            raise ValueError("n is out of range; allowed: >= 1 per request")
        return [self.sample(int(n), t, seed) for n, t, seed in requests]

    @torch.no_grad()
    def reconstruct(self, x_uint8, depth: int, temperature: float | Sequence[float] = 1.0, seed: int | None = None,
                    probabilities: bool = False):
        if depth not in (0, 1):
            raise ValueError(f"depth={depth} is out of range; allowed: 0..1")
        if depth == 0:
            return self.sample(x_uint8.shape[0], temperature, seed, probabilities)
        gen = seeded_generator(seed, x_uint8.device)
        q_mean, q_std = self._encode(self.codec.targets(x_uint8))
        z = reparameterize(q_mean, q_std, 1.0, gen)
        return self._sample_output(self._decode(z.to(self.encoder[0].weight.dtype)), gen, probabilities)


def discretized_gaussian_log_prob(mean, log_std, x, num_bits: int) -> torch.Tensor:
    """log P(x) of a Gaussian integrated over x's bin of the `num_bits` grid in [-1, 1];
    edge bins open to +-inf. Elementwise, nats."""
    half_bin = 1.0 / (2**num_bits - 1)
    inv = torch.exp(-log_std.clamp(-7, 7))
    upper = torch.where(x > 0.999, torch.full_like(x, math.inf), (x - mean + half_bin) * inv)
    lower = torch.where(x < -0.999, torch.full_like(x, -math.inf), (x - mean - half_bin) * inv)
    # Phi(upper) - Phi(lower) on the side of the mean that avoids cancellation
    flip = (lower + upper) > 0
    hi = torch.where(flip, -lower, upper)
    lo = torch.where(flip, -upper, lower)
    p = torch.special.ndtr(hi) - torch.special.ndtr(lo)
    return torch.log(p.clamp_min(1e-12))
