"""The training objective: negative ELBO in nats per data dimension, with the NVAE KL
warm-up (beta) and KL balancing across latent groups early in training."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config.schema import LossConfig
from ..model import Elbo


@dataclass
class LossTerms:
    loss: torch.Tensor  # scalar fp32, what backward() sees
    nelbo: torch.Tensor  # scalar, nats/dim (unweighted ELBO, the reported metric)
    recon: torch.Tensor  # scalar, nats/dim
    kl: torch.Tensor  # scalar, nats/dim
    kl_groups: torch.Tensor  # (G,) nats/dim per group
    beta: float


def kl_beta(step: int, c: LossConfig) -> float:
    """Linear warm-up of the KL weight from kl_beta_min to 1."""
    if c.kl_warmup_steps == 0 or step >= c.kl_warmup_start + c.kl_warmup_steps:
        return 1.0
    progress = max(0.0, (step - c.kl_warmup_start) / c.kl_warmup_steps)
    return c.kl_beta_min + (1.0 - c.kl_beta_min) * progress


def balance_coefficients(kl_groups: torch.Tensor, group_sizes: torch.Tensor) -> torch.Tensor:
    """NVAE-style balancing: each group's weight grows with its KL per latent unit, so
    groups that carry little information are pushed less and do not collapse. The
    weights have mean 1 and carry no gradient."""
    alpha = group_sizes / group_sizes.sum()
    coeff = (kl_groups.detach().abs() + 0.01) / alpha
    return coeff / coeff.mean()


def objective(elbo: Elbo, step: int, c: LossConfig, group_sizes: torch.Tensor) -> LossTerms:
    dims = float(elbo.dims)
    recon = elbo.recon.mean() / dims
    kl_groups = elbo.kl.mean(dim=1) / dims
    kl_total = kl_groups.sum()
    if c.kl_balance and step < c.kl_balance_steps and kl_groups.numel() > 1:
        kl_term = (balance_coefficients(kl_groups, group_sizes.to(kl_groups.device)) * kl_groups).sum()
    else:
        kl_term = kl_total
    beta = kl_beta(step, c)
    loss = recon + beta * kl_term
    return LossTerms(loss, (recon + kl_total).detach(), recon.detach(), kl_total.detach(), kl_groups.detach(), beta)


def mean_terms(terms: list[LossTerms]) -> LossTerms:
    """The terms of equal-sized micro-batches combined into those of their union."""
    if len(terms) == 1:
        return terms[0]
    mean = lambda name: torch.stack([getattr(t, name).detach() for t in terms]).mean(0)
    return LossTerms(mean("loss"), mean("nelbo"), mean("recon"), mean("kl"), mean("kl_groups"), terms[0].beta)


def group_sizes(model) -> torch.Tensor:
    return torch.tensor([float(z * h * w) for z, h, w in model.group_shapes])
