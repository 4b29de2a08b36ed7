"""uint8 images <-> what the likelihoods score and what the networks read."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..config.schema import ModelConfig


class ImageCodec:
    """uint8 images <-> the likelihood's targets and the network's input (official grids)."""

    def __init__(self, m: ModelConfig):
        self.likelihood, self.num_bits, self.pad = m.likelihood, m.num_bits, m.pad
        self.design, self.mean, self.std = m.design, m.input_mean, m.input_std

    def targets(self, x_uint8: torch.Tensor) -> torch.Tensor:
        if self.likelihood == "bernoulli":
            return (x_uint8 >= 128).float()
        step = 2 ** (8 - self.num_bits)
        reduced = torch.div(x_uint8.long(), step, rounding_mode="floor") * step
        return (reduced.float() - 127.5) / 127.5

    def net_input(self, targets: torch.Tensor, x_uint8: torch.Tensor | None = None) -> torch.Tensor:
        """Efficient design: the targets themselves (binary pixels as 0/1); original design:
        the 8-bit image standardised with the dataset's constants. Zero-padded by `pad`."""
        if self.design == "original" and self.likelihood != "bernoulli":
            assert x_uint8 is not None
            x = (x_uint8.float() - self.mean) / self.std
        else:
            x = targets
        return F.pad(x, [self.pad] * 4) if self.pad else x

    def to_uint8(self, values: torch.Tensor) -> torch.Tensor:
        """Likelihood samples (Bernoulli {0,1} or grid values) -> uint8 0..255."""
        if self.likelihood == "bernoulli":
            return (values * 255).round().to(torch.uint8)
        return (values * 127.5 + 127.5).round().clamp(0, 255).to(torch.uint8)
