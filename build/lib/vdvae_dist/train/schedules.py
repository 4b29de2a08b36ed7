"""The schedules of training, selected by config, each following one official code exactly
(quirks included) or our own choice:

- learning rate (`optim.lr_schedule`): Efficient-VDVAE's NarrowCosineDecay
  (efficient_vdvae_torch/model/schedules.py, as train.py creates it), openai/vdvae's
  linear_warmup (train_helpers.py), or our warm-up + cosine;
- the KL weight beta (`loss.kl_schedule`): Efficient-VDVAE's LinearBetaSchedule, our
  linear warm-up, or none (openai/vdvae);
- KL balancing across latent groups (`loss.kl_balance`): Efficient-VDVAE's GammaSchedule
  with scaled_gamma, NVAE's balancing, or none.

Every function takes the global step (0 for the first update) and gives the value the
official loop applies at that step."""
from __future__ import annotations

import functools
import math
import struct

import torch

from ..config.schema import LossConfig, OptimConfig


def f32(x: float) -> float:
    """x rounded to the nearest float32. One IEEE float32 operation equals the float64
    result of the same operands rounded once like this (53 >= 2 * 24 + 2 bits)."""
    return struct.unpack("f", struct.pack("f", x))[0]


_PI32 = f32(math.pi)


class EfficientVdvaeCosine:
    """Efficient-VDVAE's learning rate at every global step k, bit for bit as its float32
    tensor: lr * min(1, k / warmup_steps) for k < decay_start (0 at k = 0), then torch's
    CosineAnnealingLR(T_max=decay_steps, eta_min=min_lr) recursion on the absolute step,
        lr_k = eta + (1 + cos(pi k / T)) / (1 + cos(pi (k - 1) / T)) * (lr_{k-1} - eta),
    with pi k / T a float32 tensor, the cosines in float64 and the update in float32, and
    torch's restart branch at k = T + 1 (mod 2T). So the minimum is reached at decay_steps,
    not decay_start + decay_steps, and the float32 recursion drifts up to 0.45% from its
    closed form: this follows the recursion, memoised as it advances."""

    def __init__(self, o: OptimConfig):
        self.base, self.eta = o.lr, o.min_lr
        self.warmup, self.start, self.T = float(o.warmup_steps), o.decay_start, o.decay_steps
        # what torch's restart branch adds at k = T + 1 (mod 2T); absorbed at min_lr in every official config
        self._restart = f32((self.base - self.eta) * (1 - math.cos(math.pi / self.T)) / 2)
        self._values: list[float] = []  # lr at steps 0..len-1
        self._settled_from: int | None = None  # from this step on, the value is min_lr for good

    def _angle(self, k: int) -> float:
        return f32(f32(_PI32 * f32(k)) / f32(self.T))

    def _next(self, k: int, previous: float) -> float:
        if k < self.start:  # torch: lr * minimum(1, last_epoch / warmup_steps) in float32
            ramp = 1.0 if self.warmup == 0 else min(1.0, f32(f32(k) / f32(self.warmup)))
            return f32(f32(self.base) * ramp)
        if (k - 1 - self.T) % (2 * self.T) == 0:  # CosineAnnealingLR's restart branch
            return f32(previous + self._restart)
        ratio = (1 + math.cos(self._angle(k))) / (1 + math.cos(self._angle(k - 1)))
        eta = f32(self.eta)
        return f32(f32(f32(ratio) * f32(previous - eta)) + eta)

    def __call__(self, step: int) -> float:
        if self._settled_from is not None and step >= self._settled_from:
            return f32(self.eta)
        while len(self._values) <= step:
            k = len(self._values)
            value = self._next(k, self._values[-1] if self._values else 0.0)
            self._values.append(value)
            eta = f32(self.eta)
            if k > self.T and value == eta and f32(eta + self._restart) == eta:  # a fixed point: min_lr from here on
                self._settled_from = k
                return eta if step >= k else self._values[step]
        return self._values[step]


def vdvae_linear_warmup(step: int, o: OptimConfig) -> float:
    """openai/vdvae: LambdaLR(linear_warmup(warmup_iters)): lr * (1 if step > w else step / w)."""
    w = o.warmup_steps
    return o.lr * (1.0 if step > w or w == 0 else step / w)


def warmup_cosine(step: int, o: OptimConfig) -> float:
    """Ours: linear warm-up reaching lr at step warmup_steps - 1, constant until decay_start,
    cosine from decay_start to min_lr over decay_steps."""
    if o.warmup_steps and step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    if step < o.decay_start:
        return o.lr
    progress = min(1.0, (step - o.decay_start) / o.decay_steps)
    return o.min_lr + (o.lr - o.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


@functools.lru_cache(maxsize=8)
def _evd_schedule(o: OptimConfig) -> EfficientVdvaeCosine:
    return EfficientVdvaeCosine(o)


def lr_at(step: int, o: OptimConfig) -> float:
    """The learning rate of the update at global step `step` under optim.lr_schedule."""
    if o.lr_schedule == "efficient-vdvae":
        return _evd_schedule(o)(step)
    if o.lr_schedule == "vdvae":
        return vdvae_linear_warmup(step, o)
    return warmup_cosine(step, o)


def kl_beta(step: int, c: LossConfig) -> float:
    """The KL weight of the update at global step `step` under loss.kl_schedule."""
    if c.kl_schedule == "none":
        return 1.0
    if c.kl_schedule == "efficient-vdvae-linear":  # torch.clamp(torch.tensor(x), beta_min, 1) in float32
        x = f32((step - c.kl_warmup_start) / (c.kl_warmup_start + c.kl_warmup_steps))
        return min(max(x, f32(c.kl_beta_min)), 1.0)
    if c.kl_warmup_steps == 0 or step >= c.kl_warmup_start + c.kl_warmup_steps:
        return 1.0
    progress = max(0.0, (step - c.kl_warmup_start) / c.kl_warmup_steps)
    return c.kl_beta_min + (1.0 - c.kl_beta_min) * progress


def balance_weights(kl_groups: torch.Tensor, group_sizes: torch.Tensor, step: int,
                    c: LossConfig) -> torch.Tensor | None:
    """Weights (no gradient) of the per-group KL terms (G,) at global step `step`, or None
    for the plain sum. `kl_groups`: per-group KL per data dimension, batch mean;
    `group_sizes`: latent elements (C*H*W) per group."""
    if kl_groups.numel() < 2 or c.kl_balance == "off":
        return None
    kl = kl_groups.detach()
    sizes = group_sizes.to(kl.device, kl.dtype)
    if c.kl_balance == "efficient-vdvae-gamma":
        if step > c.kl_balance_steps:  # inclusive: the official `step_n <= max_steps`
            return None
        per_latent = kl / sizes  # scaled_gamma: the group's KL per latent element (no epsilon)
        return kl.numel() * per_latent / per_latent.sum()
    if step >= c.kl_balance_steps:
        return None
    coeff = (kl.abs() + 0.01) / (sizes / sizes.sum())  # NVAE: groups that carry little are pushed less
    return coeff / coeff.mean()
