"""Bottom-up and top-down networks of the (Efficient-)VDVAE.

Topology from the config: per resolution r (highest first) a width, a bottleneck, a
kernel (3x3 above 2 px, else 1x1), `bu` bottom-up cells, `td` top-down blocks and
`skips` connections between them. Efficient design: min(bu, td) skips per resolution,
each a 1x1 projection of a bottom-up cell's output taken before pooling (the last
`skips` cells send them); top-down block j at r uses skip min(j, skips - 1) counted from
the pool side, so extra top-down blocks reuse the last one. Original design: one skip
per resolution, the un-projected output of the last cell.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from ..config.schema import ModelConfig
from .latent import gaussian_kl, gaussian_params, reparameterize
from .layers import AvgPool, LearnedPool, LearnedUnpool, NearestUnpool, ResidualCell


@dataclass(frozen=True)
class Level:
    res: int
    width: int
    mid: int
    kernel: int
    bu: int
    td: int
    skips: int


def plan(m: ModelConfig) -> list[Level]:
    """Levels of the hierarchy, highest resolution first."""
    levels = []
    for r in sorted(m.bu_blocks, reverse=True):
        w = m.widths.get(r, m.width)
        ratio = m.bottlenecks.get(r, m.bottleneck)
        bu, td = m.bu_blocks[r], m.td_blocks[r]
        skips = min(bu, td) if m.design == "efficient" else 1
        levels.append(Level(r, w, int(w * ratio), 3 if r > 2 else 1, bu, td, skips))
    return levels


def _maybe_checkpoint(enabled: bool, fn, *args):
    if enabled and torch.is_grad_enabled():
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


class BottomUpLevel(nn.Module):
    def __init__(self, level: Level, next_level: Level | None, design: str, cell_scale: float,
                 use_checkpoint: bool):
        super().__init__()
        self.first_skip = level.bu - level.skips
        self.use_checkpoint = use_checkpoint
        self.cells = nn.ModuleList(
            ResidualCell(level.width, level.mid, level.width, level.kernel, design, last_scale=cell_scale)
            for _ in range(level.bu)
        )
        if design == "efficient":
            self.skip_projs = nn.ModuleList(nn.Conv2d(level.width, level.width, 1) for _ in range(level.skips))
        else:
            self.skip_projs = nn.ModuleList(nn.Identity() for _ in range(level.skips))
        self.pool = None
        if next_level is not None:
            stride = level.res // next_level.res
            pool_cls = LearnedPool if design == "efficient" else AvgPool
            self.pool = pool_cls(level.width, next_level.width, stride)

    def forward(self, x_BCHW: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        skips = []
        for i, cell in enumerate(self.cells):
            x_BCHW = _maybe_checkpoint(self.use_checkpoint, cell, x_BCHW)
            if i >= self.first_skip:
                skips.append(self.skip_projs[i - self.first_skip](x_BCHW))
        if self.pool is not None:
            x_BCHW = self.pool(x_BCHW)
        return x_BCHW, skips


class TopDownBlock(nn.Module):
    """One latent group: prior net, posterior net on [h, skip], z sampled and projected back."""

    def __init__(self, level: Level, m: ModelConfig, n_blocks: int):
        super().__init__()
        w, mid, k, z = level.width, level.mid, level.kernel, m.latent_channels
        self.design, self.z = m.design, z
        self.softplus_beta = m.latent_softplus_beta
        scale = math.sqrt(1.0 / n_blocks)
        if m.design == "efficient":
            # prior output = [residual (w), prior features (w)] -> 1x1 to (mean, std)
            self.prior = ResidualCell(w, mid, 2 * w, k, "efficient", residual=False)
            self.prior_proj = nn.Conv2d(w, 2 * z, 1)
            self.posterior = ResidualCell(2 * w, mid, w, k, "efficient", residual=False)
            self.posterior_proj = nn.Conv2d(w, 2 * z, 1)
        else:
            # VDVAE: prior output = [mean, log std, residual], last conv zero-initialised
            self.prior = ResidualCell(w, mid, 2 * z + w, k, "original", residual=False, last_scale=0.0)
            self.prior_proj = nn.Identity()
            self.posterior = ResidualCell(2 * w, mid, 2 * z, k, "original", residual=False)
            self.posterior_proj = nn.Identity()
        self.z_proj = nn.Conv2d(z, w, 1)
        with torch.no_grad():
            self.z_proj.weight.mul_(scale)
        self.resnet = ResidualCell(w, mid, w, k, m.design, last_scale=scale)

    def _prior(self, h_BCHW: torch.Tensor):
        feats = self.prior(h_BCHW)
        if self.design == "efficient":
            residual, prior_feats = feats.chunk(2, dim=1)
            stats = self.prior_proj(prior_feats)
        else:
            stats, residual = feats[:, : 2 * self.z], feats[:, 2 * self.z :]
        return residual, gaussian_params(stats, self.design, self.softplus_beta)

    def forward(self, h_BCHW: torch.Tensor, skip_BCHW: torch.Tensor | None, temperature: float = 1.0,
                generator: torch.Generator | None = None):
        """Returns (h, kl_BZHW or None). With a skip, z comes from the posterior
        (reconstruction / training); without one, from the prior at `temperature`."""
        residual, (p_mean, p_std) = self._prior(h_BCHW)
        kl = None
        if skip_BCHW is not None:
            post = self.posterior_proj(self.posterior(torch.cat([h_BCHW, skip_BCHW], dim=1)))
            q_mean, q_std = gaussian_params(post, self.design, self.softplus_beta)
            z = reparameterize(q_mean, q_std, 1.0, generator)
            kl = gaussian_kl(q_mean, q_std, p_mean, p_std)
        else:
            z = reparameterize(p_mean, p_std, temperature, generator)
        h_BCHW = h_BCHW + residual
        h_BCHW = h_BCHW + self.z_proj(z.to(h_BCHW.dtype))
        return self.resnet(h_BCHW), kl


class TopDownLevel(nn.Module):
    def __init__(self, level: Level, prev_level: Level | None, m: ModelConfig, n_blocks: int):
        super().__init__()
        self.res, self.skips = level.res, level.skips
        self.unpool = None
        if prev_level is not None:
            unpool_cls = LearnedUnpool if m.design == "efficient" else NearestUnpool
            self.unpool = unpool_cls(prev_level.width, level.width, level.res // prev_level.res, level.res)
        self.blocks = nn.ModuleList(TopDownBlock(level, m, n_blocks) for _ in range(level.td))

    def skip_index(self, j: int) -> int:
        """Index into this level's bottom-up skips (in bottom-up order) for block j."""
        return self.skips - 1 - min(j, self.skips - 1)
