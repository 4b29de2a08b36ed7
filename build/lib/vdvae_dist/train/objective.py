"""The training objective: negative ELBO in nats per data dimension (the unit of both
official codes: batch means of per-image sums divided by the image's dimensions), with the
KL weight beta and the KL balancing of train/schedules.py:
    loss = recon + beta * sum_g w_g KL_g   (w_g = 1 without balancing)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config.schema import LossConfig
from ..model import Elbo
from .schedules import balance_weights, kl_beta


@dataclass
class LossTerms:
    loss: torch.Tensor  # scalar fp32, what backward() sees
    nelbo: torch.Tensor  # scalar, nats/dim (unweighted ELBO, the reported metric)
    recon: torch.Tensor  # scalar, nats/dim
    kl: torch.Tensor  # scalar, nats/dim
    kl_groups: torch.Tensor  # (G,) nats/dim per group
    beta: float


def objective(elbo: Elbo, step: int, c: LossConfig, group_sizes: torch.Tensor) -> LossTerms:
    dims = float(elbo.dims)
    recon = elbo.recon.mean() / dims
    kl_groups = elbo.kl.mean(dim=1) / dims
    kl_total = kl_groups.sum()
    weights = balance_weights(kl_groups, group_sizes, step, c)
    kl_term = kl_total if weights is None else (weights * kl_groups).sum()
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
