"""One training step and one evaluation step (no Ray, no DeepSpeed here)."""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn

from ..config.schema import LossConfig
from .objective import LossTerms, objective
from .update import Outcome, UpdateRule


def autocast(device: torch.device, bf16: bool):
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def train_step(model: nn.Module, rule: UpdateRule, batch_uint8: torch.Tensor, loss_cfg: LossConfig,
               sizes: torch.Tensor, bf16: bool) -> tuple[LossTerms, Outcome]:
    """Forward in bf16 autocast, loss in fp32, backward, then skip-or-step and EMA."""
    model.train()
    with autocast(batch_uint8.device, bf16):
        elbo = model(batch_uint8)
    terms = objective(elbo, rule.step, loss_cfg, sizes)
    terms.loss.backward()
    return terms, rule.apply(model)


@torch.no_grad()
def eval_nelbo(model: nn.Module, batch_uint8: torch.Tensor, bf16: bool) -> tuple[torch.Tensor, int]:
    """Per-image negative ELBO (nats) and the data dimensions per image."""
    model.eval()
    with autocast(batch_uint8.device, bf16):
        elbo = model(batch_uint8)
    return elbo.nelbo.float(), elbo.dims
