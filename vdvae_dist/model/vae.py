"""The hierarchical VAE (Efficient-VDVAE, or the original VDVAE by config switch).

Images enter and leave as uint8 (N, C, H, W) in 0..255. Colour models see them reduced
to `num_bits` and scaled to [-1, 1]; Bernoulli models see pixels >= 128 as 1.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config.schema import ModelConfig
from . import likelihoods as lik
from .blocks import BottomUpLevel, TopDownLevel, _maybe_checkpoint, plan
from .latent import RowNoise
from .layers import LearnedStart


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


class ImageCodec:
    """uint8 images <-> the likelihood's targets and the network's input."""

    def __init__(self, m: ModelConfig):
        self.likelihood, self.num_bits, self.pad = m.likelihood, m.num_bits, m.pad

    def targets(self, x_uint8: torch.Tensor) -> torch.Tensor:
        if self.likelihood == "bernoulli":
            return (x_uint8 >= 128).float()
        levels = 2**self.num_bits - 1
        k = torch.div(x_uint8.long(), 2 ** (8 - self.num_bits), rounding_mode="floor")
        return k.float() * (2.0 / levels) - 1.0

    def net_input(self, targets: torch.Tensor) -> torch.Tensor:
        x = targets * 2.0 - 1.0 if self.likelihood == "bernoulli" else targets
        return F.pad(x, [self.pad] * 4) if self.pad else x

    def to_uint8(self, values: torch.Tensor) -> torch.Tensor:
        """Likelihood samples (Bernoulli {0,1} or the [-1,1] grid) -> uint8 0..255."""
        if self.likelihood == "bernoulli":
            return (values * 255).round().to(torch.uint8)
        levels = 2**self.num_bits - 1
        k = torch.round((values + 1.0) * (levels / 2.0))
        return torch.round(k * (255.0 / levels)).to(torch.uint8)


def _temperatures(temperature: float | Sequence[float], groups: int) -> list[float]:
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


def _generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    if seed is None:
        return None
    g = torch.Generator(device=device)
    g.manual_seed(int(seed))
    return g


class VDVAE(nn.Module):
    def __init__(self, m: ModelConfig):
        super().__init__()
        self.config = m
        self.codec = ImageCodec(m)
        levels = plan(m)
        n_td = sum(lv.td for lv in levels)
        n_bu = sum(lv.bu for lv in levels)
        bu_scale = math.sqrt(1.0 / (n_td if m.design == "efficient" else n_bu))
        ckpt = m.checkpoint_activations
        k_in = 1 if m.design == "efficient" else 3
        self.input_conv = nn.Conv2d(m.channels, levels[0].width, k_in, padding=k_in // 2)
        self.bottom_up = nn.ModuleList(
            BottomUpLevel(lv, nxt, m.design, bu_scale, ckpt)
            for lv, nxt in zip(levels, list(levels[1:]) + [None])
        )
        up = levels[::-1]
        self.top_down = nn.ModuleList(
            TopDownLevel(lv, prev, m, n_td) for lv, prev in zip(up, [None] + up[:-1])
        )
        self.h0 = LearnedStart(up[0].width, up[0].res, m.design)
        out_ch = 1 if m.likelihood == "bernoulli" else 10 * m.mixtures
        self.output_conv = nn.Conv2d(levels[0].width, out_ch, 1)
        self.group_shapes = [(m.latent_channels, lv.res, lv.res) for lv in up for _ in range(lv.td)]

    @property
    def num_groups(self) -> int:
        return len(self.group_shapes)

    @property
    def data_shape(self) -> tuple[int, int, int]:
        m = self.config
        side = m.resolution - 2 * m.pad
        return (m.channels, side, side)

    # -- networks ---------------------------------------------------------------------
    def _bottom_up(self, x_BCHW: torch.Tensor) -> dict[int, list[torch.Tensor]]:
        h = self.input_conv(x_BCHW)
        skips = {}
        for level, lv_mod in zip(plan(self.config), self.bottom_up):
            h, skips[level.res] = lv_mod(h)
        return skips

    def _top_down(self, batch: int, skips: dict[int, list[torch.Tensor]] | None, depth: int,
                  temps: list[float], generator: torch.Generator | None, dtype: torch.dtype):
        h = self.h0(batch, dtype)
        kls: list[torch.Tensor] = []
        g = 0
        for level in self.top_down:
            if level.unpool is not None:
                h = level.unpool(h)
            for j, block in enumerate(level.blocks):
                skip = skips[level.res][level.skip_index(j)] if (skips is not None and g < depth) else None
                if skip is not None and generator is None:
                    h, kl = _maybe_checkpoint(self.config.checkpoint_activations, block, h, skip)
                else:
                    h, kl = block(h, skip, temps[g], generator)
                if kl is not None:
                    kls.append(kl)
                g += 1
        return self.output_conv(h), kls

    def _crop(self, out_BCHW: torch.Tensor) -> torch.Tensor:
        p = self.config.pad
        return out_BCHW[:, :, p:-p, p:-p] if p else out_BCHW

    def _log_prob(self, out_BCHW: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        m = self.config
        out = self._crop(out_BCHW)
        if m.likelihood == "bernoulli":
            return lik.bernoulli_log_prob(out, targets)
        scale = "softplus" if m.design == "efficient" else "exp"
        return lik.dmol_log_prob(out, targets, num_bits=m.num_bits, scale=scale,
                                 softplus_beta=m.output_softplus_beta)

    def _sample_output(self, out_BCHW: torch.Tensor, generator) -> torch.Tensor:
        m = self.config
        out = self._crop(out_BCHW)
        if m.likelihood == "bernoulli":
            values = lik.bernoulli_sample(out, generator=generator)
        else:
            scale = "softplus" if m.design == "efficient" else "exp"
            values = lik.dmol_sample(out, num_bits=m.num_bits, scale=scale,
                                     softplus_beta=m.output_softplus_beta, generator=generator)
        return self.codec.to_uint8(values)

    def _input_dtype(self) -> torch.dtype:
        return self.input_conv.weight.dtype

    # -- public API -------------------------------------------------------------------
    def forward(self, x_uint8: torch.Tensor, stats: bool = False) -> Elbo:
        """Negative ELBO of uint8 images (N, C, H, W) with all latents from the posterior."""
        targets = self.codec.targets(x_uint8)
        x = self.codec.net_input(targets).to(self._input_dtype())
        x = x.contiguous(memory_format=torch.channels_last)
        skips = self._bottom_up(x)
        out, kls = self._top_down(x.shape[0], skips, self.num_groups, [1.0] * self.num_groups, None, x.dtype)
        recon = -self._log_prob(out, targets).sum(dim=(1, 2))
        kl = torch.stack([k.sum(dim=(1, 2, 3)) for k in kls])
        chans = [k.sum(dim=(2, 3)) for k in kls] if stats else None
        c, h, w = self.data_shape
        return Elbo(recon + kl.sum(0), recon, kl, c * h * w, chans)

    @torch.no_grad()
    def sample(self, n: int, temperature: float | Sequence[float] = 1.0, seed: int | None = None) -> torch.Tensor:
        """n images from the prior, uint8 (n, C, H, W). The same seed gives the same images."""
        if n < 1:
            raise ValueError(f"n={n} is out of range; allowed: >= 1")
        temps = _temperatures(temperature, self.num_groups)
        device = self.output_conv.weight.device
        gen = _generator(seed, device)
        out, _ = self._top_down(n, None, 0, temps, gen, self._input_dtype())
        return self._sample_output(out, gen)

    @torch.no_grad()
    def sample_batch(self, requests: Sequence[tuple[int, float | Sequence[float], int | None]]) -> list[torch.Tensor]:
        """Several (n, temperature, seed) requests in one forward pass. Each request's rows
        draw from its own seed, so it gets the images `sample(n, temperature, seed)` gives
        alone (up to the float rounding of batched kernels)."""
        sizes = [int(n) for n, _, _ in requests]
        if not sizes or min(sizes) < 1:
            raise ValueError(f"n={min(sizes, default=0)} is out of range; allowed: >= 1 per request")
        device = self.output_conv.weight.device
        per_request = [_temperatures(t, self.num_groups) for _, t, _ in requests]
        temps = [torch.tensor([t[g] for t, n in zip(per_request, sizes) for _ in range(n)], device=device)
                 for g in range(self.num_groups)]  # one value per row and group
        noise = RowNoise.seeded(sizes, [seed for _, _, seed in requests], device)
        out, _ = self._top_down(sum(sizes), None, 0, temps, noise, self._input_dtype())
        return list(self._sample_output(out, noise).split(sizes))

    @torch.no_grad()
    def reconstruct(self, x_uint8: torch.Tensor, depth: int, temperature: float | Sequence[float] = 1.0,
                    seed: int | None = None) -> torch.Tensor:
        """Keep the posterior latents of the first `depth` groups, sample the rest from the
        prior at `temperature`; returns uint8 images like the input."""
        if not 0 <= depth <= self.num_groups:
            raise ValueError(f"depth={depth} is out of range; allowed: 0..{self.num_groups}")
        temps = _temperatures(temperature, self.num_groups)
        gen = _generator(seed, x_uint8.device)
        targets = self.codec.targets(x_uint8)
        x = self.codec.net_input(targets).to(self._input_dtype())
        skips = self._bottom_up(x) if depth > 0 else None
        out, _ = self._top_down(x.shape[0], skips, depth, temps, gen, x.dtype)
        return self._sample_output(out, gen)
