"""Evaluation with the EMA weights: the exact pass (every held-out image once, summed over
ranks), and the figures a run publishes."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import numpy as np
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
    channel_kl: list[np.ndarray] = field(default_factory=list)  # per group (Z,): KL summed over images, H, W


@torch.no_grad()
def evaluate(model: ImageModel, batches: Iterable[torch.Tensor], bf16: bool = False, seed: int = 0) -> Score:
    """Mean negative ELBO over `batches` (all posterior latents). In a distributed run each
    rank passes its own share and every rank gets the total."""
    model.eval()
    p = next(model.parameters())
    # on the model's device: NCCL reduces CUDA tensors only
    total = torch.zeros((), dtype=torch.float64, device=p.device)
    count = torch.zeros((), dtype=torch.float64, device=p.device)
    sizes = [z for z, _, _ in model.group_shapes]
    kl = torch.zeros(sum(sizes), dtype=torch.float64, device=p.device)  # every group's channels, end to end
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    # the one-sample ELBO draws latent noise: seeded, so a score does not depend on what ran
    # before it (training, a resume) and the global RNG is left as it was
    with torch.random.fork_rng(devices=[p.device] if p.device.type == "cuda" else []):
        torch.manual_seed(noise_seed(seed, -1, rank))
        for batch in batches:
            with autocast(p.device, bf16):
                elbo = model(place(batch, p.device, memory_format_of(model)), stats=True)
            total += elbo.nelbo.double().sum()
            count += len(batch)
            kl += torch.cat([c.double().sum(0) for c in elbo.kl_channels])
    if dist.is_available() and dist.is_initialized():
        stats = torch.cat([torch.stack([total, count]), kl])
        dist.all_reduce(stats)
        total, count, kl = stats[0], stats[1], stats[2:]
    if count == 0:
        raise ValueError("the evaluation pass saw no images")
    nats = float(total / count)
    c, h, w = model.data_shape
    return Score(nats, bits_per_dim(nats, c * h * w), int(count), [k.numpy() for k in kl.cpu().split(sizes)])


def log_evaluation_figures(tracker, model: ImageModel, score: Score, images_uint8: torch.Tensor, seed: int):
    """The `evaluate` command's figures from the final exact pass, at cheap settings: the
    reconstructions of `images_uint8` at the default depths, the latent-utilisation figures
    and 4 samples per temperature; the Utilisation they show."""
    from ..evaluation.figures import (kl_by_group, kl_cumulative, reconstructions_by_depth, samples_by_temperature)
    from ..evaluation.latents import Utilisation
    from ..evaluation.report import TEMPERATURES, default_depths

    tracker.log_image(reconstructions_by_depth(model, images_uint8, default_depths(model.num_groups), seed),
                      "reconstructions/by_depth.png")
    util = Utilisation.from_sums(score.channel_kl, model.group_shapes, score.images)
    tracker.log_image(kl_by_group(util, [h for _, h, _ in model.group_shapes]), "evaluation/kl_by_group.png")
    tracker.log_image(kl_cumulative(util), "evaluation/kl_cumulative.png")
    tracker.log_image(samples_by_temperature(model, TEMPERATURES, 4, seed), "evaluation/samples_by_temperature.png")
    return util
