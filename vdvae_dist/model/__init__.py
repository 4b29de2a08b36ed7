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


__all__ = ["AEVB", "VDVAE", "Elbo", "ImageModel", "bits_per_dim", "build_model", "count_parameters"]
