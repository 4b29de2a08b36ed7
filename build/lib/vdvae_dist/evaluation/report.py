"""A whole evaluation of a run's EMA weights: two passes over the held-out split (bounds and
per-channel KL, then the active-channel and prefix ELBOs), in shares that run in this
process or as Ray tasks, then the figures and a JSON-ready summary."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch

from ..core.precision import resolve as resolve_precision
from ..model import bits_per_dim
from .figures import kl_by_group, kl_cumulative, reconstructions_by_depth, samples_by_temperature
from .latents import ACTIVE_THRESHOLD, Utilisation
from .measures import Measures, Tally, measure

TEMPERATURES = (1.0, 0.9, 0.8, 0.6)


def default_depths(groups: int) -> list[int]:
    """0, a quarter, half, three quarters and all of the groups."""
    return sorted({0, groups // 4, groups // 2, 3 * groups // 4, groups})


@dataclass
class EvalSettings:
    split: str = "test"
    batch_size: int = 64
    importance_samples: int = 1  # K of the importance-weighted bound (1: a one-sample ELBO estimate)
    active_threshold: float = ACTIVE_THRESHOLD  # nats per channel-position
    depths: Sequence[int] | None = None  # prefix lengths of the depth study (None: default_depths)
    temperatures: Sequence[float] = TEMPERATURES
    figure_images: int = 8  # images (depth grid) and samples per temperature row
    seed: int = 0
    shares: int = 1  # parts of the split measured separately (Ray tasks)

    def __post_init__(self):
        checks = {"batch_size": (self.batch_size, 1), "importance_samples": (self.importance_samples, 1),
                  "figure_images": (self.figure_images, 1), "shares": (self.shares, 1)}
        for name, (value, low) in checks.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name}={value!r} is out of range; allowed: an integer >= {low}")
        if not (self.active_threshold >= 0 and math.isfinite(self.active_threshold)):
            raise ValueError(f"active_threshold={self.active_threshold!r} is out of range; allowed: a number >= 0")
        if any(not (0 <= t <= 10) for t in self.temperatures):
            raise ValueError(f"temperatures={list(self.temperatures)} is out of range; allowed: numbers in [0, 10]")


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def measure_share(weights_uri: str, data: str, settings: EvalSettings, share: int, keep=None,
                  depths: Sequence[int] = (), bounds: bool = True) -> Measures:
    """Measures of one share (rank `share` of settings.shares) of the split; runs anywhere
    the weights and shards can be read (this process, a Ray task). bounds=False: only the
    active-channel and prefix ELBOs (the second pass)."""
    from ..tracking.logged_weights import load_weights

    weights = load_weights(weights_uri)
    model = weights.model.to(device())
    batches = held_out(data, settings.split, settings.batch_size, weights.cfg.data.binarize, share, settings.shares)
    return measure(model, batches, importance_samples=settings.importance_samples if bounds else 0, keep=keep,
                   depths=depths, seed=settings.seed, share=share, elbo=bounds,
                   bf16=resolve_precision(weights.cfg.engine.precision, device()).bf16)


def held_out(data: str, split: str, batch_size: int, binarize: bool, share: int = 0, shares: int = 1):
    """uint8 batches of one share of the split, binarized as training evaluates them."""
    from ..data.pipeline import binarized_for_evaluation
    from ..data.stream import eval_loader

    loader = eval_loader(data, split, batch_size, rank=share, world=shares, num_workers=0)
    return binarized_for_evaluation((images for images, _ in loader), binarize)


Runner = Callable[[list[dict]], list[Measures]]  # keyword arguments of measure_share, one per share


def in_process(calls: list[dict]) -> list[Measures]:
    return [measure_share(**kw) for kw in calls]


def _bounds(t: Tally, dims: int) -> dict:
    return {"nats_per_image": t.mean, "nats_stderr": t.stderr, "bits_per_dim": bits_per_dim(t.mean, dims),
            "bits_per_dim_stderr": bits_per_dim(t.stderr, dims)}


@dataclass
class Report:
    summary: dict  # JSON-ready
    figures: dict[str, np.ndarray] = field(default_factory=dict)  # artifact name -> HWC uint8


def evaluate_weights(weights_uri: str, data: str, settings: EvalSettings, run: Runner = in_process,
                     figures: bool = True) -> Report:
    from ..tracking.logged_weights import load_weights

    weights = load_weights(weights_uri)
    model = weights.model.to(device())
    groups = model.num_groups
    depths = sorted(set(settings.depths if settings.depths is not None else default_depths(groups)))
    bad = [d for d in depths if not 0 <= d <= groups]
    if bad:
        raise ValueError(f"depth {bad[0]} is out of range; allowed: 0..{groups} (latent groups of this model)")
    base = dict(weights_uri=weights_uri, data=data, settings=settings)
    first = sum(run([{**base, "share": i} for i in range(settings.shares)]), Measures())
    images = first.elbo.count
    if images == 0:
        raise ValueError(f"{data}: split {settings.split!r} gave no images")
    util = Utilisation.from_sums(first.channel_kl, model.group_shapes, images, settings.active_threshold)
    second = sum(run([{**base, "share": i, "keep": util.keep, "depths": [d for d in depths if d < groups],
                       "bounds": False}
                      for i in range(settings.shares)]), Measures())
    dims = int(np.prod(model.data_shape))
    by_depth = {d: (second.depth[d] if d < groups else first.elbo) for d in depths}
    summary = {
        "weights": weights.source, "step": weights.step, "data": data, "split": settings.split, "images": images,
        "importance_samples": settings.importance_samples, "dims": dims,
        "elbo_bits_per_dim": bits_per_dim(first.elbo.mean, dims), "iwae_bits_per_dim": bits_per_dim(first.iwae.mean, dims),
        "elbo": _bounds(first.elbo, dims), "iwae": _bounds(first.iwae, dims),
        "active_fraction": util.active_fraction, "active_channels": util.active_channels,
        "total_channels": util.total_channels, "active_threshold_nats": util.threshold,
        "active_elbo_bits_per_dim": bits_per_dim(second.active.mean, dims), "active_elbo": _bounds(second.active, dims),
        "kl_per_group_nats": [float(v) for v in util.kl_per_group],
        "depth_bits_per_dim": {str(d): bits_per_dim(t.mean, dims) for d, t in by_depth.items()},
        "temperatures": list(settings.temperatures), "seed": settings.seed,
        "settings": {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in asdict(settings).items()},
    }
    report = Report(summary)
    if figures:
        first_batch = next(iter(held_out(data, settings.split, settings.figure_images, weights.cfg.data.binarize)))
        report.figures = evaluation_figures(model, util, first_batch.to(device()), depths, settings.temperatures,
                                            settings.figure_images, settings.seed)
    return report


def evaluation_figures(model, util: Utilisation, images_uint8: torch.Tensor, depths: Sequence[int],
                       temperatures: Sequence[float], samples: int, seed: int) -> dict[str, np.ndarray]:
    """The figures of an evaluation (and of the end of a training run), by file name:
    KL per group, the cumulative KL share, reconstructions of `images_uint8` from a growing
    prefix of groups, and `samples` per temperature."""
    return {
        "kl_by_group.png": kl_by_group(util, [h for _, h, _ in model.group_shapes]),
        "kl_cumulative.png": kl_cumulative(util),
        "reconstructions_by_depth.png": reconstructions_by_depth(model, images_uint8, depths, seed),
        "samples_by_temperature.png": samples_by_temperature(model, temperatures, samples, seed),
    }
