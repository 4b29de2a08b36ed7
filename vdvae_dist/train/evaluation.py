"""Evaluation with the EMA weights: the exact pass (every held-out image once, summed over
ranks), and the figures a run publishes."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
import torch.distributed as dist

from ..model import ImageModel, bits_per_dim
from .rule import memory_format_of
from .step import noise_seed, place
from .torch_rule import autocast


@dataclass
class Score:
    nats_per_image: float
    bits_per_dim: float
    images: int


@torch.no_grad()
def evaluate(model: ImageModel, batches: Iterable[torch.Tensor], bf16: bool = False, seed: int = 0) -> Score:
    """Mean negative ELBO over `batches` (all posterior latents). In a distributed run each
    rank passes its own share and every rank gets the total."""
    model.eval()
    p = next(model.parameters())
    # on the model's device: NCCL reduces CUDA tensors only
    total = torch.zeros((), dtype=torch.float64, device=p.device)
    count = torch.zeros((), dtype=torch.float64, device=p.device)
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    # the one-sample ELBO draws latent noise: seeded, so a score does not depend on what ran
    # before it (training, a resume) and the global RNG is left as it was
    with torch.random.fork_rng(devices=[p.device] if p.device.type == "cuda" else []):
        torch.manual_seed(noise_seed(seed, -1, rank))
        for batch in batches:
            with autocast(p.device, bf16):
                elbo = model(place(batch, p.device, memory_format_of(model)))
            total += elbo.nelbo.double().sum()
            count += len(batch)
    if dist.is_available() and dist.is_initialized():
        stats = torch.stack([total, count])
        dist.all_reduce(stats)
        total, count = stats
    if count == 0:
        raise ValueError("the evaluation pass saw no images")
    nats = float(total / count)
    c, h, w = model.data_shape
    return Score(nats, bits_per_dim(nats, c * h * w), int(count))


def reconstructions_by_depth(model: ImageModel, images_uint8: torch.Tensor, seed: int):
    """The evaluation's depth figure at its default depths (0, 1/4, 1/2, 3/4, all groups)."""
    from ..evaluation.figures import reconstructions_by_depth as by_depth
    from ..evaluation.report import default_depths

    return by_depth(model, images_uint8, default_depths(model.num_groups), seed)
