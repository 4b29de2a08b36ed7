"""One update from one worker's share of the global batch, for any update rule (batches
are moved to the network by core/placement.py's place(), here and nowhere else in training)."""
from __future__ import annotations

import torch

from ..config.schema import LossConfig
from ..core.placement import place
from ..core.seeding import noise_seed
from .objective import LossTerms, mean_terms, objective
from .rule import Outcome, UpdateRule


def train_step(rule: UpdateRule, batch_uint8: torch.Tensor, loss_cfg: LossConfig, group_sizes: torch.Tensor,
               seed: int, rank: int = 0) -> tuple[LossTerms, Outcome]:
    """Forward, fp32 loss and backward per micro-batch (latent noise seeded by the
    micro-batch's global index), then skip-or-step and EMA."""
    expected = rule.micro_batch * rule.accumulation
    if len(batch_uint8) != expected:
        raise ValueError(f"a worker's batch has {len(batch_uint8)} images; the update rule expects "
                         f"{rule.accumulation} micro-batches of {rule.micro_batch}")
    batch_uint8 = place(batch_uint8, rule.device, rule.memory_format)
    terms = []
    for i, micro in enumerate(batch_uint8.split(rule.micro_batch)):
        torch.manual_seed(noise_seed(seed, rule.step, rank * rule.accumulation + i))
        terms.append(objective(rule.forward(micro), rule.step, loss_cfg, group_sizes))
        rule.backward(terms[-1].loss, last=i + 1 == rule.accumulation)
    return mean_terms(terms), rule.apply()
