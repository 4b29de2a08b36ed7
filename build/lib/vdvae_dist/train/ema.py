"""Exponential moving average of the weights, kept in fp32 beside the trained model, with
both official update formulas: ema <- ema * r + w * (1 - r) in float32, r as written
(Efficient-VDVAE) or r as a float32 tensor (openai/vdvae, optim.ema_decay_float32)."""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

from .schedules import f32


def ema_rates(decay: float, as_float32: bool) -> tuple[float, float]:
    """(r, 1 - r) of the update. With a float32 rate, 1 - r is computed from float32(r)
    (exact): 0.9999 then weighs new weights by 1.000166e-4, not 1e-4."""
    keep = f32(decay) if as_float32 else decay
    return keep, 1.0 - keep


@torch.no_grad()
def ema_update_(shadow: list[torch.Tensor], current: list[torch.Tensor], keep: float, take: float) -> None:
    """shadow <- shadow * keep + current * take, in place (no copy of the weights)."""
    if not shadow:
        return
    torch._foreach_mul_(shadow, keep)
    torch._foreach_add_(shadow, current, alpha=take)


class EMA:
    def __init__(self, model: nn.Module, decay: float, as_float32: bool = False):
        assert 0.0 <= decay < 1.0
        self.keep, self.take = ema_rates(decay, as_float32)
        self.model = copy.deepcopy(model).float().eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """For every parameter: ema <- ema * r + weights * (1 - r)."""
        shadow = list(self.model.parameters())
        ema_update_(shadow, [p.detach().to(s.dtype) for p, s in zip(model.parameters(), shadow)], self.keep, self.take)

    def state_dict(self) -> dict:
        return self.model.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state)
