"""Diagonal Gaussian latents: parameterisation, reparameterised samples and analytic KL."""
from __future__ import annotations

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


def reparameterize(mean, std, temperature: float = 1.0, generator: torch.Generator | None = None):
    if generator is None:
        eps = torch.randn_like(mean)
    else:
        eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    return mean + std * (eps * temperature)
