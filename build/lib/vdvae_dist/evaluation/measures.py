"""The one evaluation pass over held-out images, for `vdvae-dist evaluate` and for the end
of every training run: per-image bounds and per-channel KL, summed so that the shares of
several ranks (all_reduce) or Ray tasks (+) merge into the totals of the whole set."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np
import torch

from ..core.placement import memory_format_of, place
from ..core.precision import autocast
from ..core.seeding import noise_seed
from ..model import ImageModel
from ..model.latent import LatentChoice


@dataclass
class Tally:
    """Sum, sum of squares and count of a per-image value (float64): its mean and the
    standard error of that mean, mergeable across shares."""

    total: float = 0.0
    squares: float = 0.0
    count: int = 0

    def add(self, values: torch.Tensor) -> None:
        v = values.detach().double().cpu()
        self.total += float(v.sum())
        self.squares += float((v * v).sum())
        self.count += v.numel()

    def __add__(self, other: "Tally") -> "Tally":
        return Tally(self.total + other.total, self.squares + other.squares, self.count + other.count)

    @property
    def mean(self) -> float:
        return self.total / self.count if self.count else math.nan

    @property
    def stderr(self) -> float:
        if self.count < 2:
            return math.nan
        variance = max(0.0, (self.squares - self.count * self.mean**2) / (self.count - 1))
        return math.sqrt(variance / self.count)


def _merge(a: dict, b: dict) -> dict:
    return {k: a.get(k, Tally()) + b.get(k, Tally()) for k in {**a, **b}}


@dataclass
class Measures:
    """Totals of one share of the evaluation set. Bounds are negative log-likelihoods in
    nats per image: `elbo` (all posterior latents, analytic KL), `iwae` (importance-weighted,
    K samples), `active` (only the channels in the given keep masks from the posterior),
    `depth[d]` (the first d groups from the posterior, the rest from the prior)."""

    elbo: Tally = field(default_factory=Tally)
    iwae: Tally = field(default_factory=Tally)
    active: Tally = field(default_factory=Tally)
    depth: dict[int, Tally] = field(default_factory=dict)
    channel_kl: list[np.ndarray] = field(default_factory=list)  # per group (Z,): KL summed over images, H, W

    def __add__(self, other: "Measures") -> "Measures":
        kl = ([a + b for a, b in zip(self.channel_kl, other.channel_kl)] if self.channel_kl and other.channel_kl
              else self.channel_kl or other.channel_kl)
        return Measures(self.elbo + other.elbo, self.iwae + other.iwae, self.active + other.active,
                        _merge(self.depth, other.depth), [np.asarray(k) for k in kl])


def prefix_choices(group_shapes: Sequence[tuple[int, int, int]], depth: int) -> list[LatentChoice]:
    """The first `depth` groups from the posterior, the others wholly from the prior."""
    return [LatentChoice() if g < depth else LatentChoice(keep=torch.zeros(z, dtype=torch.bool))
            for g, (z, _, _) in enumerate(group_shapes)]


def keep_choices(keep: Sequence[np.ndarray]) -> list[LatentChoice]:
    return [LatentChoice(keep=torch.as_tensor(np.asarray(k, dtype=bool))) for k in keep]


@torch.no_grad()
def measure(model: ImageModel, batches: Iterable[torch.Tensor], *, importance_samples: int = 0,
            keep: Sequence[np.ndarray] | None = None, depths: Sequence[int] = (), seed: int = 0, share: int = 0,
            bf16: bool = False, elbo: bool = True) -> Measures:
    """Totals over `batches` (uint8 images). The ELBO and per-channel KL unless elbo=False;
    the importance-weighted bound with importance_samples >= 1; the active-channel ELBO
    with `keep` (one bool mask per group); the prefix ELBOs for `depths`. Latent noise is
    seeded by (seed, share, batch index), so a pass is reproducible."""
    model.eval()
    p = next(model.parameters())
    out = Measures()
    kl_sums = [torch.zeros(z, dtype=torch.float64) for z, _, _ in model.group_shapes]
    choices = {"active": keep_choices(keep)} if keep is not None else {}
    choices.update({d: prefix_choices(model.group_shapes, d) for d in depths})
    for i, batch in enumerate(batches):
        x = place(batch, p.device, memory_format_of(model))
        g = torch.Generator(device=p.device)
        g.manual_seed(noise_seed(seed, -2, share * 1_000_003 + i))
        with autocast(p.device, bf16):
            if elbo:
                full = model(x, stats=True, noise=g)
                out.elbo.add(full.nelbo)
                for k, c in zip(kl_sums, full.kl_channels):
                    k += c.double().sum(0).cpu()
            if importance_samples:
                log_w = model.importance_log_weights(x, importance_samples, noise=g).double()
                out.iwae.add(-(torch.logsumexp(log_w, dim=1) - math.log(importance_samples)))
            for name, choice in choices.items():
                nelbo = model(x, noise=g, posterior=choice).nelbo
                (out.active if name == "active" else out.depth.setdefault(name, Tally())).add(nelbo)
    out.channel_kl = [k.numpy() for k in kl_sums] if elbo else []
    return out


def all_reduce(m: Measures, device: torch.device) -> Measures:
    """The ELBO totals and per-channel KL of every rank's share, on every rank (a collective
    when a process group is up; `m` itself otherwise). Reduced on `device`: NCCL reduces
    CUDA tensors only."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return m
    sizes = [len(k) for k in m.channel_kl]
    stats = torch.tensor([m.elbo.total, m.elbo.squares, m.elbo.count, *np.concatenate(m.channel_kl or [[]])],
                         dtype=torch.float64, device=device)
    dist.all_reduce(stats)
    stats = stats.cpu().numpy()
    kl = np.split(stats[3:], np.cumsum(sizes)[:-1]) if sizes else []
    return Measures(elbo=Tally(float(stats[0]), float(stats[1]), int(stats[2])), channel_kl=list(kl))
