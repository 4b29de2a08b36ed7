"""Exponential moving average of the weights, kept in fp32 beside the trained model."""
from __future__ import annotations

import copy

import torch
import torch.nn as nn


class EMA:
    def __init__(self, model: nn.Module, decay: float):
        assert 0.0 <= decay < 1.0
        self.decay = decay
        self.model = copy.deepcopy(model).float().eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """ema <- decay * ema + (1 - decay) * weights, for every parameter."""
        shadow = list(self.model.parameters())
        current = [p.detach().to(s.dtype) for p, s in zip(model.parameters(), shadow)]
        torch._foreach_lerp_(shadow, current, 1.0 - self.decay)

    def state_dict(self) -> dict:
        return self.model.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state)
