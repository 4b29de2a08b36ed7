"""The update rule: what differs between plain torch and DeepSpeed ZeRO, behind one small
interface the training loop uses (forward, backward, skip-or-step with EMA, checkpoint
state, EMA weights). This module also holds what both implementations share: the
optimizer, the skip decision, the step counters, divergence detection and the batch split
(the schedules are train/schedules.py)."""
from __future__ import annotations

from typing import TYPE_CHECKING

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from ..config.schema import OptimConfig, RunConfig
from ..model import Elbo


if TYPE_CHECKING:
    from ..core.precision import Precision
    from .compiled import CompiledBlocks

class TrainingDiverged(RuntimeError):
    """Raised after `optim.max_consecutive_skips` skipped updates in a row."""


@dataclass
class Outcome:
    grad_norm: float  # global L2 norm before clipping (inf/nan when the gradient was not finite)
    skipped: bool
    lr: float  # of this step (not applied when skipped)
    clipped: bool = False  # the gradient was scaled down to optim.clip_norm (had the step not been skipped)
    grad_norm_after_clip: float | None = None  # the norm the optimizer got (measured by the torch rule)


class UpdateRule(Protocol):
    step: int  # updates attempted (applied + skipped)
    skipped: int
    micro_batch: int  # images per forward/backward pass on this worker
    accumulation: int  # passes per update
    device: torch.device  # where the network's parameters live
    memory_format: torch.memory_format  # the layout batches should have to match them
    module: torch.nn.Module  # the plain network (for hooks and evaluation shapes)
    precision: "Precision"  # engine.precision resolved on `device` (core/precision.py)
    bf16: bool  # precision.bf16
    compiled: "CompiledBlocks | None"  # engine.compile (train/compiled.py); None when off

    def forward(self, micro_uint8: torch.Tensor) -> Elbo: ...
    def backward(self, loss: torch.Tensor, last: bool) -> None: ...
    def apply(self) -> Outcome: ...
    def ema_weights(self) -> dict[str, torch.Tensor]: ...  # collective: full fp32 EMA on every rank
    def save(self, folder: Path, client_state: dict) -> None: ...  # collective
    def load(self, folder: Path) -> dict: ...  # returns the client state


def make_optimizer(params, o: OptimConfig) -> torch.optim.Optimizer:
    if o.name == "adamax":
        return torch.optim.Adamax(params, lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay)
    return torch.optim.AdamW(params, lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay)


def should_skip(grad_norm: float, o: OptimConfig) -> bool:
    """Both official codes: skip on a non-finite norm or one >= the threshold (inclusive);
    optim.gradient_skip = false (Efficient-VDVAE's gradient_skip) never skips."""
    if not o.gradient_skip:
        return False
    return not math.isfinite(grad_norm) or (o.skip_threshold > 0 and grad_norm >= o.skip_threshold)


def clips(grad_norm: float, o: OptimConfig) -> bool:
    """torch's clip_grad_norm_ (both official codes): scale by clip / (norm + 1e-6) when that is < 1."""
    return o.clip_norm > 0 and o.clip_norm / (grad_norm + 1e-6) < 1


def check_divergence(consecutive_skips: int, grad_norm: float, o: OptimConfig) -> None:
    """Stop instead of skipping forever (a known failure of the original code)."""
    if o.max_consecutive_skips and consecutive_skips >= o.max_consecutive_skips:
        raise TrainingDiverged(
            f"{consecutive_skips} consecutive updates skipped (last gradient norm {grad_norm:.4g}, "
            f"optim.skip_threshold={o.skip_threshold}); the run diverged. Lower optim.lr, raise "
            f"optim.skip_threshold, or resume from an earlier checkpoint."
        )


def count_update(rule, skipped: bool, grad_norm: float, o: OptimConfig) -> None:
    """After an update was applied or skipped: the rule's step and skip counters, then the
    divergence check (both rules count the same way)."""
    if skipped:
        rule.skipped += 1
        rule.consecutive_skips += 1
    else:
        rule.consecutive_skips = 0
    rule.step += 1
    check_divergence(rule.consecutive_skips, grad_norm, o)


def counters(rule) -> dict:
    """What a checkpoint keeps of the rule's counters."""
    return {"step": rule.step, "skipped": rule.skipped, "consecutive_skips": rule.consecutive_skips}


def restore_counters(rule, saved: dict) -> None:
    rule.step, rule.skipped = int(saved["step"]), int(saved["skipped"])
    rule.consecutive_skips = int(saved["consecutive_skips"])


def batch_split(cfg: RunConfig, world: int) -> tuple[int, int]:
    """(micro-batch per worker, gradient accumulation steps) for this world size."""
    per_worker, rest = divmod(cfg.optim.batch_size, world)
    if rest:
        raise ValueError(f"optim.batch_size={cfg.optim.batch_size} is out of range; allowed: a multiple of the "
                         f"{world} workers")
    micro = cfg.engine.micro_batch_size or per_worker
    if per_worker % micro:
        raise ValueError(f"engine.micro_batch_size={micro} is out of range; allowed: a divisor of the "
                         f"per-worker batch {per_worker} (optim.batch_size / {world} workers)")
    return micro, per_worker // micro
