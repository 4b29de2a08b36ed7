"""The hierarchical VAE (Efficient-VDVAE, or the original VDVAE by config switch).

Images enter and leave as uint8 (N, C, H, W) in 0..255. Colour likelihoods score them
reduced to `num_bits` and scaled by (u - 127.5) / 127.5; Bernoulli ones see pixels >= 128
as 1. The topology comes from the layout strings (config/layout.py).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from ..config.schema import ModelConfig
from . import likelihoods as lik
from ..config.validate import model_layout
from .codec import ImageCodec
from .interface import Elbo, sampling_temperatures, seeded_generator
from .blocks import EncoderCell, TopDownBlock, build_paths, dims, maybe_checkpoint
from .latent import ZERO_NOISE, LatentChoice, Noise, RowNoise
from .layers import LearnedStart, OutputAffine, conv


class VDVAE(nn.Module):
    def __init__(self, m: ModelConfig):
        super().__init__()
        self.config = m
        self.codec = ImageCodec(m)
        self.layout = model_layout(m)
        top, low = dims(m, m.resolution), dims(m, self.layout.lowest)
        k_in = 1 if m.design == "efficient" else 3
        self.input_conv = conv(m.channels, top.width, k_in, m.design)
        self.encoder, self.decoder = build_paths(self.layout, m)
        self.start = LearnedStart(low.width, self.layout.lowest, m.design)
        self.output_affine = OutputAffine(top.width) if m.design == "original" else None
        out_ch = 1 if m.likelihood == "bernoulli" else 10 * m.mixtures
        self.output_conv = conv(top.width, out_ch, 1, m.design)
        self.group_shapes = [(m.latent_channels, u.res, u.res) for u in self.layout.blocks]

    @property
    def num_groups(self) -> int:
        return len(self.group_shapes)

    @property
    def data_shape(self) -> tuple[int, int, int]:
        m = self.config
        side = m.resolution - 2 * m.pad
        return (m.channels, side, side)

    # -- networks ---------------------------------------------------------------------
    def _bottom_up(self, x_BCHW: torch.Tensor) -> list[torch.Tensor]:
        """The skips, in the order the encoder sends them."""
        h = self.input_conv(x_BCHW)
        skips = []
        ckpt = self.config.checkpoint_activations
        for unit in self.encoder:
            if isinstance(unit, EncoderCell):
                h, skip = maybe_checkpoint(ckpt, unit, h)
                if unit.sends_skip:
                    skips.append(skip)
            else:
                h = unit(h)
        return skips

    def _top_down(self, batch: int, skips: list[torch.Tensor] | None, depth: int,
                  temps: list[float], noise: Noise, dtype: torch.dtype,
                  posterior: Sequence[LatentChoice | None] | None = None):
        """Output parameters and the KL of each group that read the posterior. The first
        `depth` groups read their skip (posterior), the rest sample the prior; `posterior`
        holds an evaluation's choice per group (see LatentChoice)."""
        h = self.start(batch, dtype)
        kls: list[torch.Tensor] = []
        g = 0
        for unit in self.decoder:
            if not isinstance(unit, TopDownBlock):
                h = unit(h)
                continue
            skip = skips[unit.skip] if (skips is not None and g < depth) else None
            choice = posterior[g] if posterior is not None else None
            if skip is not None and noise is None and choice is None:
                h, kl = maybe_checkpoint(self.config.checkpoint_activations, unit, h, skip)
            else:
                h, kl = unit(h, skip, temps[g], noise, choice)
            if kl is not None:
                kls.append(kl)
            g += 1
        if self.output_affine is not None:
            h = self.output_affine(h)
        return self.output_conv(h), kls

    def _crop(self, out_BCHW: torch.Tensor) -> torch.Tensor:
        p = self.config.pad
        return out_BCHW[:, :, p:-p, p:-p] if p else out_BCHW

    def _dmol_args(self) -> dict:
        m = self.config
        if m.design == "efficient":
            return dict(num_bits=m.num_bits, scale="softplus", softplus_beta=m.output_softplus_beta,
                        min_log_scale=m.output_min_log_scale)
        return dict(num_bits=m.num_bits, scale="exp", min_log_scale=-7.0)

    def _log_prob(self, out_BCHW: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        m = self.config
        out = self._crop(out_BCHW)
        if m.likelihood == "bernoulli":
            return lik.bernoulli_log_prob(out, targets)
        high = None if m.design == "efficient" else lik.VDVAE_HIGH_EDGE
        return lik.dmol_log_prob(out, targets, high_edge=high, **self._dmol_args())

    def _sample_output(self, out_BCHW: torch.Tensor, generator, probabilities: bool = False) -> torch.Tensor:
        out = self._crop(out_BCHW)
        if self.config.likelihood == "bernoulli":
            values = torch.sigmoid(out.float()) if probabilities else lik.bernoulli_sample(out, generator=generator)
        else:
            values = lik.dmol_sample(out, generator=generator, **self._dmol_args())
        return self.codec.to_uint8(values)

    def _input_dtype(self) -> torch.dtype:
        """The dtype the activations flow in: the weights' (fp32, or bf16 under DeepSpeed's
        bf16), or autocast's. Under autocast the residual streams must start in its dtype:
        one fp32 learned tensor would promote every add after it to fp32 and make each
        convolution cast its input (measured ~20% of a bf16 step on CPU)."""
        weight, kind = self.input_conv.weight, self.input_conv.weight.device.type
        if torch.amp.is_autocast_available(kind) and torch.is_autocast_enabled(kind):  # "meta" has no autocast
            return torch.get_autocast_dtype(kind)
        return weight.dtype

    def _encode(self, x_uint8: torch.Tensor):
        """(likelihood targets, skips) of the images."""
        targets = self.codec.targets(x_uint8)
        x = self.codec.net_input(targets, x_uint8).to(self._input_dtype())
        return targets, self._bottom_up(x.contiguous(memory_format=torch.channels_last))

    def _posterior_pass(self, x_uint8: torch.Tensor, noise: Noise, posterior=None, encoded=None):
        targets, skips = encoded if encoded is not None else self._encode(x_uint8)
        out, kls = self._top_down(x_uint8.shape[0], skips, self.num_groups, [1.0] * self.num_groups, noise,
                                  self._input_dtype(), posterior)
        return out, targets, kls

    def _elbo(self, out, targets, kls, stats: bool) -> Elbo:
        recon = -self._log_prob(out, targets).sum(dim=(1, 2))
        kl = torch.stack([k.sum(dim=(1, 2, 3)) for k in kls])
        chans = [k.sum(dim=(2, 3)) for k in kls] if stats else None
        c, h, w = self.data_shape
        return Elbo(recon + kl.sum(0), recon, kl, c * h * w, chans)

    # -- public API -------------------------------------------------------------------
    def forward(self, x_uint8: torch.Tensor, stats: bool = False, noise: Noise = None,
                posterior: Sequence[LatentChoice | None] | None = None) -> Elbo:
        """Negative ELBO of uint8 images (N, C, H, W) with all latents from the posterior
        (`noise`: a generator, ZERO_NOISE for posterior means, None for the global RNG;
        `posterior`: per group, which channels come from the posterior, see LatentChoice)."""
        return self._elbo(*self._posterior_pass(x_uint8, noise, posterior), stats)

    @torch.no_grad()
    def importance_log_weights(self, x_uint8: torch.Tensor, samples: int, noise: Noise = None) -> torch.Tensor:
        """(N, samples) of log p(x, z_k) - log q(z_k | x), z_k drawn from the posterior: the
        encoder runs once, the top-down path once per sample (memory of one pass)."""
        encoded = self._encode(x_uint8)
        sampled = [LatentChoice(sampled=True)] * self.num_groups
        return torch.stack([-self._elbo(*self._posterior_pass(x_uint8, noise, sampled, encoded), False).nelbo
                            for _ in range(samples)], dim=1)

    @torch.no_grad()
    def output_params(self, x_uint8: torch.Tensor | None = None, n: int = 1,
                      temperature: float | Sequence[float] = 1.0, noise: Noise = ZERO_NOISE) -> torch.Tensor:
        """The raw output-convolution tensor (N, P, H, W) before the likelihood: of the
        posterior path for images `x_uint8`, else of `n` prior draws at `temperature`."""
        if x_uint8 is not None:
            return self._posterior_pass(x_uint8, noise)[0]
        temps = sampling_temperatures(temperature, self.num_groups)
        return self._top_down(n, None, 0, temps, noise, self._input_dtype())[0]
    @torch.no_grad()
    def sample(self, n: int, temperature: float | Sequence[float] = 1.0, seed: int | None = None,
               probabilities: bool = False) -> torch.Tensor:
        """n images from the prior, uint8 (n, C, H, W). The same seed gives the same images.
        probabilities: a Bernoulli likelihood's pixel probabilities as grey levels instead of
        a draw of black and white pixels (how the papers show binary samples); other
        likelihoods ignore it."""
        if n < 1:
            raise ValueError(f"n={n} is out of range; allowed: >= 1")
        temps = sampling_temperatures(temperature, self.num_groups)
        device = self.output_conv.weight.device
        gen = seeded_generator(seed, device)
        out, _ = self._top_down(n, None, 0, temps, gen, self._input_dtype())
        return self._sample_output(out, gen, probabilities)

    @torch.no_grad()
    def sample_batch(self, requests: Sequence[tuple[int, float | Sequence[float], int | None]]) -> list[torch.Tensor]:
        """Several (n, temperature, seed) requests in one forward pass. Each request's rows
        draw from its own seed, so it gets the images `sample(n, temperature, seed)` gives
        alone (up to the float rounding of batched kernels)."""
        sizes = [int(n) for n, _, _ in requests]
        if not sizes or min(sizes) < 1:
            raise ValueError(f"n={min(sizes, default=0)} is out of range; allowed: >= 1 per request")
        device = self.output_conv.weight.device
        per_request = [sampling_temperatures(t, self.num_groups) for _, t, _ in requests]
        temps = [torch.tensor([t[g] for t, n in zip(per_request, sizes) for _ in range(n)], device=device)
                 for g in range(self.num_groups)]  # one value per row and group
        noise = RowNoise.seeded(sizes, [seed for _, _, seed in requests], device)
        out, _ = self._top_down(sum(sizes), None, 0, temps, noise, self._input_dtype())
        return list(self._sample_output(out, noise).split(sizes))

    @torch.no_grad()
    def reconstruct(self, x_uint8: torch.Tensor, depth: int, temperature: float | Sequence[float] = 1.0,
                    seed: int | None = None, probabilities: bool = False) -> torch.Tensor:
        """Keep the posterior latents of the first `depth` groups, sample the rest from the
        prior at `temperature`; returns uint8 images like the input (probabilities: as in
        `sample`)."""
        if not 0 <= depth <= self.num_groups:
            raise ValueError(f"depth={depth} is out of range; allowed: 0..{self.num_groups}")
        temps = sampling_temperatures(temperature, self.num_groups)
        gen = seeded_generator(seed, x_uint8.device)
        targets = self.codec.targets(x_uint8)
        x = self.codec.net_input(targets, x_uint8).to(self._input_dtype())
        skips = self._bottom_up(x) if depth > 0 else None
        out, _ = self._top_down(x.shape[0], skips, depth, temps, gen, x.dtype)
        return self._sample_output(out, gen, probabilities)
