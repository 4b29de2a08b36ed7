"""Models: Efficient-VDVAE / VDVAE, AEVB, likelihoods: architecture only. Imports torch and
the config only (the official checkpoints are mapped onto it by official/)."""
from __future__ import annotations

import torch.nn as nn

from ..config.schema import ModelConfig
from .aevb import AEVB
from .interface import Elbo, ImageModel, bits_per_dim
from .vae import VDVAE


def build_model(m: ModelConfig) -> ImageModel:
    return AEVB(m) if m.kind == "aevb" else VDVAE(m)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def misfit(state: dict, model: nn.Module) -> str | None:
    """The first tensor of `state` that does not fit `model` (or of `model` that `state`
    lacks), in words; None when `model.load_state_dict(state)` would take them all."""
    ours = model.state_dict()
    for key, value in state.items():
        if key not in ours:
            return f"{key!r} has no place in the network"
        if tuple(ours[key].shape) != tuple(value.shape):
            return f"{key!r} has shape {tuple(value.shape)}, the network expects {tuple(ours[key].shape)}"
    missing = [k for k in ours if k not in state]
    return f"the weights lack {missing[0]!r} ({len(missing)} missing)" if missing else None


__all__ = ["AEVB", "VDVAE", "Elbo", "ImageModel", "bits_per_dim", "build_model", "count_parameters", "misfit"]
