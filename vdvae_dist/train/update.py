"""The update rule on plain torch: optimizer + LR schedule, pre-clip global gradient
norm, gradient skipping (non-finite or above threshold), clipping, EMA."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..config.schema import OptimConfig
from .ema import EMA


class TrainingDiverged(RuntimeError):
    """Raised after `optim.max_consecutive_skips` skipped updates in a row."""


def lr_at(step: int, o: OptimConfig) -> float:
    """Linear warm-up, constant until `decay_start`, cosine to `min_lr` over `decay_steps`."""
    if o.warmup_steps and step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    if step < o.decay_start:
        return o.lr
    progress = min(1.0, (step - o.decay_start) / o.decay_steps)
    return o.min_lr + (o.lr - o.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_optimizer(params, o: OptimConfig) -> torch.optim.Optimizer:
    if o.name == "adamax":
        return torch.optim.Adamax(params, lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay)
    return torch.optim.AdamW(params, lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay)


def should_skip(grad_norm: float, threshold: float) -> bool:
    return not math.isfinite(grad_norm) or (threshold > 0 and grad_norm >= threshold)


def check_divergence(consecutive_skips: int, grad_norm: float, o: OptimConfig) -> None:
    """Stop instead of skipping forever (a known failure of the original code)."""
    if o.max_consecutive_skips and consecutive_skips >= o.max_consecutive_skips:
        raise TrainingDiverged(
            f"{consecutive_skips} consecutive updates skipped (last gradient norm {grad_norm:.4g}, "
            f"optim.skip_threshold={o.skip_threshold}); the run diverged. Lower optim.lr, raise "
            f"optim.skip_threshold, or resume from an earlier checkpoint."
        )


@dataclass
class Outcome:
    grad_norm: float  # global L2 norm before clipping
    skipped: bool
    lr: float


class UpdateRule:
    def __init__(self, model: nn.Module, o: OptimConfig):
        self.cfg = o
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(self.params, o)
        self.step = 0  # optimizer steps attempted (applied + skipped)
        self.skipped = 0
        self.consecutive_skips = 0
        self.ema = EMA(model, o.ema_decay)

    def apply(self, model: nn.Module) -> Outcome:
        """Call after backward(). Applies or skips the update; advances the schedule."""
        o = self.cfg
        grads = [p.grad for p in self.params if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads, foreach=True) if grads else torch.zeros(())
        grad_norm = float(norm)  # the one host sync per step: the skip decision needs it
        lr = lr_at(self.step, o)
        skipped = should_skip(grad_norm, o.skip_threshold)
        if skipped:
            self.skipped += 1
            self.consecutive_skips += 1
        else:
            self.consecutive_skips = 0
            if o.clip_norm > 0:
                torch.nn.utils.clip_grads_with_norm_(self.params, o.clip_norm, norm, foreach=True)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            self.optimizer.step()
            self.ema.update(model)
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        check_divergence(self.consecutive_skips, grad_norm, o)
        return Outcome(grad_norm, skipped, lr)

    def state_dict(self) -> dict:
        return {
            "optimizer": self.optimizer.state_dict(),
            "ema": self.ema.state_dict(),
            "step": self.step,
            "skipped": self.skipped,
            "consecutive_skips": self.consecutive_skips,
        }

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.ema.load_state_dict(state["ema"])
        self.step = int(state["step"])
        self.skipped = int(state["skipped"])
        self.consecutive_skips = int(state["consecutive_skips"])
