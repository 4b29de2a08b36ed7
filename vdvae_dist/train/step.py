"""One update from one worker's share of the global batch, for any update rule, and the
one place where batches move to the network's device and memory layout."""
from __future__ import annotations

import hashlib

import torch
import torch.nn as nn

from ..config.schema import LossConfig
from .objective import LossTerms, mean_terms, objective
from .rule import Outcome, UpdateRule


def place(batch: torch.Tensor, device: torch.device, memory_format: torch.memory_format) -> torch.Tensor:
    """The move every batch makes before it reaches a network: DeepSpeed moves the model,
    never the inputs, and the single-process model is channels_last."""
    return batch.to(device=device, memory_format=memory_format, non_blocking=True)


def check_placement(module: nn.Module, device: torch.device, memory_format: torch.memory_format):
    """Install a forward pre-hook that refuses an input on another device or memory layout
    than `module`'s parameters (a missed `place()` would otherwise fail only on a GPU)."""

    def hook(_module, args):
        x = args[0]
        wrong_format = x.dim() == 4 and not x.is_contiguous(memory_format=memory_format)
        if x.device != device or wrong_format:
            raise RuntimeError(f"a batch reached the network on {x.device} with strides {tuple(x.stride())}; its "
                               f"parameters are on {device} in {memory_format}: pass batches through place()")

    return module.register_forward_pre_hook(hook)


def noise_seed(seed: int, step: int, micro_index: int) -> int:
    """Seed of the latent noise for one micro-batch, from its global position only: with a
    fixed micro-batch size a run draws the same noise on any number of workers, and a
    resumed run the same noise as an uninterrupted one."""
    digest = hashlib.blake2b(f"{seed}/{step}/{micro_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


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
