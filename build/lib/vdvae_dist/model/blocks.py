"""Bottom-up units and top-down blocks of the (Efficient-)VDVAE, one module per unit of
the layout (config/layout.py), in execution order.

Per resolution r: width `widths[r]` (default `width`), bottleneck ratio, and a 3x3 kernel
above 2 px, 1x1 at 2 px and below (both official codes). Efficient design: a skip is a
1x1 projection of its cell's output; original design: the output itself.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn as nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from ..config.layout import DecoderUnit, EncoderUnit, Layout
from ..config.schema import ModelConfig
from .latent import LatentChoice, gaussian_kl, gaussian_params, reparameterize
from .layers import AvgPool, LearnedPool, LearnedUnpool, NearestUnpool, ResidualCell, conv


@dataclass(frozen=True)
class Dims:
    width: int
    mid: int
    kernel: int


def dims(m: ModelConfig, res: int) -> Dims:
    w = m.widths.get(res, m.width)
    return Dims(w, int(w * m.bottlenecks.get(res, m.bottleneck)), 3 if res > 2 else 1)


# Ops whose outputs "selective" checkpointing keeps: the convolutions hold nearly all the
# FLOPs; everything between them (activations, softplus, KL, adds) is cheap to redo.
_KEPT_OPS = {torch.ops.aten.convolution.default, torch.ops.aten.mm.default, torch.ops.aten.addmm.default}


def _keep_convolutions(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _KEPT_OPS else CheckpointPolicy.PREFER_RECOMPUTE


_SELECTIVE = partial(create_selective_checkpoint_contexts, _keep_convolutions)


def maybe_checkpoint(mode: str, fn, *args):
    """fn(*args) with activation checkpointing `mode` (none | selective | full, see
    ModelConfig.checkpoint_activations); plain when no gradient is being recorded."""
    if mode == "none" or not torch.is_grad_enabled():
        return fn(*args)
    if mode == "selective":
        return checkpoint(fn, *args, use_reentrant=False, context_fn=_SELECTIVE)
    return checkpoint(fn, *args, use_reentrant=False)


class EncoderCell(nn.Module):
    """A residual cell; a skip cell also returns its (projected) output as a skip."""

    def __init__(self, unit: EncoderUnit, m: ModelConfig, last_scale: float):
        super().__init__()
        d = dims(m, unit.res)
        self.cell = ResidualCell(d.width, d.mid, d.width, d.kernel, m.design, last_scale=last_scale)
        self.sends_skip = unit.kind == "skip"
        self.skip_proj = None
        if self.sends_skip and m.design == "efficient":
            self.skip_proj = conv(d.width, d.width, 1, "efficient")

    def forward(self, x_BCHW: torch.Tensor):
        x_BCHW = self.cell(x_BCHW)
        return x_BCHW, (x_BCHW if self.skip_proj is None else self.skip_proj(x_BCHW))


def encoder_unit(unit: EncoderUnit, m: ModelConfig, last_scale: float) -> nn.Module:
    if unit.kind != "pool":
        return EncoderCell(unit, m, last_scale)
    w_in, w_out = dims(m, unit.res).width, dims(m, unit.res // unit.factor).width
    return (LearnedPool if m.design == "efficient" else AvgPool)(w_in, w_out, unit.factor)


def decoder_unit(unit: DecoderUnit, m: ModelConfig, groups: int) -> nn.Module:
    if unit.kind == "block":
        return TopDownBlock(unit, m, groups)
    w_in, w_out = dims(m, unit.res // unit.factor).width, dims(m, unit.res).width
    if m.design == "efficient":
        return LearnedUnpool(w_in, w_out, unit.factor, unit.res)
    return NearestUnpool(w_in, w_out, unit.factor, unit.res, learned_bias=unit.res <= m.no_bias_above)


class TopDownBlock(nn.Module):
    """One latent group: prior net, posterior net on [h, skip], z sampled and projected back."""

    def __init__(self, unit: DecoderUnit, m: ModelConfig, groups: int):
        super().__init__()
        d = dims(m, unit.res)
        w, k, z = d.width, d.kernel, m.latent_channels
        self.design, self.z, self.skip = m.design, z, unit.skip
        self.softplus_beta = m.latent_softplus_beta
        scale = math.sqrt(1.0 / groups)
        ratio = m.bottlenecks.get(unit.res, m.bottleneck)
        if m.design == "efficient":
            # prior output = [residual (w), prior features (w)] -> 1x1 to (mean, std);
            # the posterior cell sees [h, skip] with half the ratio (its code's convention)
            self.prior = ResidualCell(w, d.mid, 2 * w, k, "efficient", residual=False)
            self.prior_proj = conv(w, 2 * z, 1, "efficient")
            self.posterior = ResidualCell(2 * w, int(2 * w * (ratio * 0.5)), w, k, "efficient", residual=False)
            self.posterior_proj = conv(w, 2 * z, 1, "efficient")
        else:
            # VDVAE: prior output = [mean, log std, residual], last conv zero-initialised
            self.prior = ResidualCell(w, d.mid, 2 * z + w, k, "original", residual=False, last_scale=0.0)
            self.prior_proj = nn.Identity()
            self.posterior = ResidualCell(2 * w, d.mid, 2 * z, k, "original", residual=False)
            self.posterior_proj = nn.Identity()
        self.z_proj = conv(z, w, 1, m.design)
        with torch.no_grad():
            self.z_proj.weight.mul_(scale)
        self.resnet = ResidualCell(w, d.mid, w, k, m.design, last_scale=scale)

    def _prior(self, h_BCHW: torch.Tensor):
        feats = self.prior(h_BCHW)
        if self.design == "efficient":
            residual, prior_feats = feats.chunk(2, dim=1)
            stats = self.prior_proj(prior_feats)
        else:
            stats, residual = feats[:, : 2 * self.z], feats[:, 2 * self.z :]
        return residual, gaussian_params(stats, self.design, self.softplus_beta)

    def forward(self, h_BCHW: torch.Tensor, skip_BCHW: torch.Tensor | None, temperature: float = 1.0,
                generator=None, posterior: LatentChoice | None = None):
        """Returns (h, kl_BZHW or None). With a skip, z comes from the posterior
        (reconstruction / training); without one, from the prior at `temperature`.
        `posterior` (evaluation only) takes some channels from the prior instead and/or
        returns the sampled log q(z)/p(z) in place of the analytic KL."""
        residual, (p_mean, p_std) = self._prior(h_BCHW)
        kl = None
        if skip_BCHW is not None:
            post = self.posterior_proj(self.posterior(torch.cat([h_BCHW, skip_BCHW], dim=1)))
            q_mean, q_std = gaussian_params(post, self.design, self.softplus_beta)
            z = reparameterize(q_mean, q_std, 1.0, generator)
            if posterior is None:
                kl = gaussian_kl(q_mean, q_std, p_mean, p_std)
            else:
                z, kl = posterior.apply(z, q_mean, q_std, p_mean, p_std, generator)
        else:
            z = reparameterize(p_mean, p_std, temperature, generator)
        h_BCHW = h_BCHW + residual
        h_BCHW = h_BCHW + self.z_proj(z.to(h_BCHW.dtype))
        return self.resnet(h_BCHW), kl


def build_paths(layout: Layout, m: ModelConfig) -> tuple[nn.ModuleList, nn.ModuleList]:
    """(encoder units, decoder units) with each design's initial scaling of the residual
    branches: sqrt(1 / latent groups) (efficient) or sqrt(1 / encoder cells) (original)."""
    groups = layout.num_groups
    enc_scale = math.sqrt(1.0 / (groups if m.design == "efficient" else layout.num_cells))
    encoder = nn.ModuleList(encoder_unit(u, m, enc_scale) for u in layout.encoder)
    decoder = nn.ModuleList(decoder_unit(u, m, groups) for u in layout.decoder)
    return encoder, decoder
