"""The evaluation's figures as HWC uint8 arrays (PNG-ready): KL per group, the cumulative
KL share over channels, reconstructions from a growing prefix of groups, samples by
temperature."""
from __future__ import annotations

import io
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from ..artifacts.images import READABLE_SIDE, grid
from .latents import Utilisation


def _rendered(fig) -> np.ndarray:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return np.asarray(Image.open(buf).convert("RGB"))


def _figure(width: float = 7.0, height: float = 3.5):
    import matplotlib

    matplotlib.use("Agg", force=False)  # files only; no display on workers or CI
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(width, height))


def kl_by_group(u: Utilisation, resolutions: Sequence[int]) -> np.ndarray:
    fig, ax = _figure(max(5.0, 0.25 * len(u.positions)))
    kl = u.kl_per_group
    ax.bar(range(len(kl)), kl, color="#4c72b0")
    ax.set_xticks(range(len(kl)), [str(r) for r in resolutions], fontsize=7, rotation=90)
    ax.set_xlabel("latent group (resolution), top of the decoder first")
    ax.set_ylabel("KL per image (nats)")
    ax.set_title(f"KL by latent group; {u.active_channels}/{u.total_channels} channels active "
                 f"({100 * u.active_fraction:.1f}%, > {u.threshold:g} nats per position)", fontsize=9)
    return _rendered(fig)


def kl_cumulative(u: Utilisation) -> np.ndarray:
    share = u.cumulative_share()
    fig, ax = _figure(5.0, 3.5)
    ranks = np.arange(1, len(share) + 1) / len(share)
    ax.plot(100 * ranks, 100 * share, color="#4c72b0")
    ax.axvline(100 * u.active_fraction, color="#c44e52", linestyle="--", label="active channels")
    ax.set_xlabel("channels, largest KL per position first (% of all)")
    ax.set_ylabel("share of the total KL (%)")
    ax.set_ylim(0, 101)
    ax.legend(loc="lower right", fontsize=8)
    return _rendered(fig)


@torch.no_grad()
def reconstructions_by_depth(model, images_uint8: torch.Tensor, depths: Sequence[int], seed: int) -> np.ndarray:
    """One row per image: the image, then reconstructions keeping the posterior latents of
    the first d groups for every d in `depths` (the rest from the prior); Bernoulli outputs as
    pixel probabilities, small images upscaled."""
    columns = [images_uint8] + [model.reconstruct(images_uint8, d, seed=seed, probabilities=True) for d in depths]
    rows = torch.stack(columns, dim=1).flatten(0, 1)  # image-major: each row is one image
    return grid(rows.cpu(), cols=len(columns), min_side=READABLE_SIDE)


@torch.no_grad()
def samples_by_temperature(model, temperatures: Sequence[float], n: int, seed: int) -> np.ndarray:
    """One row per temperature, the same seed on every row; Bernoulli outputs as pixel
    probabilities (as the papers show binary samples), small images upscaled."""
    rows = [model.sample(n, t, seed=seed, probabilities=True).cpu() for t in temperatures]
    return grid(torch.cat(rows), cols=n, min_side=READABLE_SIDE)
