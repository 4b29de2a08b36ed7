"""Gradient skipping above a threshold, hooked into DeepSpeed's optimizer.

DeepSpeed already skips a step whose global gradient norm is not finite, without
touching weights or optimizer state, and counts it. It has no threshold, so we wrap the
global-norm computation of the ZeRO optimizer it builds (private and different per
stage): the wrapper records the true pre-clip norm and reports inf when it is >= the
threshold. The norm is global (all-reduced, or computed from all-reduced gradients), so
every rank takes the same decision. Stage 0 replicates everything: with bf16 we decide
in DeepSpeed's overflow check; in fp32 DeepSpeed steps the torch optimizer directly, so
we guard its step() and clip there.

Private APIs move between releases, so: the DeepSpeed version is checked against the
tested one at start-up, and `NormProbe.require_called` raises when an applied step did
not pass through the hook (it is no longer on the step path)."""
from __future__ import annotations

import math

import torch

TESTED_DEEPSPEED = "0.19.8"


def check_version(allow_untested: bool) -> None:
    import deepspeed

    found = deepspeed.__version__.split("+")[0]
    if found != TESTED_DEEPSPEED and not allow_untested:
        raise ValueError(
            f"deepspeed=={found} is installed; gradient skipping hooks DeepSpeed internals tested with "
            f"deepspeed=={TESTED_DEEPSPEED} only. Install that version, or set "
            "engine.allow_untested_deepspeed=true to try (a step that bypasses the hook then fails loudly)")


class NormProbe:
    """The pre-clip global norm of the last step, and the skip verdict."""

    def __init__(self, threshold: float):
        self.threshold = threshold
        self.reset()

    def reset(self) -> None:
        self.norm, self.called = float("nan"), False

    def verdict(self, norm: float, like: torch.Tensor) -> torch.Tensor | None:
        """inf (skip) when `norm` is at or above the threshold, else None (DeepSpeed decides)."""
        self.norm, self.called = norm, True
        if self.threshold > 0 and math.isfinite(norm) and norm >= self.threshold:
            return torch.full_like(like, float("inf"))
        return None

    def require_called(self, step_applied: bool) -> None:
        # a skipped step may stop in DeepSpeed's own overflow check before the norm
        if step_applied and not self.called:
            raise RuntimeError(
                "DeepSpeed applied an update without computing the gradient norm through our hook: this "
                f"DeepSpeed release moved the private method engine/hooks.py patches (tested: {TESTED_DEEPSPEED}); "
                "gradient skipping would be silently off")


def install(engine, stage: int, clip_norm: float, probe: NormProbe) -> None:
    from deepspeed.runtime.utils import combine_grad_norm_groups

    zero = engine.optimizer
    if stage == 0:
        _guard_stage0(zero, clip_norm, probe)
    elif stage == 3:
        original = zero._get_norm_groups

        def norm_groups():
            groups = original()
            total = combine_grad_norm_groups(groups)
            inf = probe.verdict(float(total), torch.as_tensor(total, dtype=torch.float32))
            return groups if inf is None else [inf for _ in groups]

        zero._get_norm_groups = norm_groups
    else:
        original = zero.scaled_global_norm

        def scaled_global_norm(*args, **kwargs):
            total = original(*args, **kwargs)
            inf = probe.verdict(float(total), torch.as_tensor(total, dtype=torch.float32))
            return total if inf is None else inf

        zero.scaled_global_norm = scaled_global_norm


def _guard_stage0(zero, clip_norm: float, probe: NormProbe) -> None:
    """Stage 0 replicates the weights and averages the gradients over ranks before
    step(), so the local gradient norm is the global one."""

    def skip(params) -> tuple[bool, torch.Tensor]:
        norms = [torch.linalg.vector_norm(p.grad.float()) for p in params if p.grad is not None]
        norm = torch.linalg.vector_norm(torch.stack(norms))
        return probe.verdict(float(norm), norm) is not None or not math.isfinite(float(norm)), norm

    if hasattr(zero, "overflow_checker"):  # bf16: DeepSpeed's unfused optimizer skips on "overflow"
        low_precision = [p for group in zero.fp16_groups for p in group]
        zero.overflow_checker.check = lambda *args, **kwargs: skip(low_precision)[0]
        return
    # fp32: the torch optimizer itself, which never skips; tell DeepSpeed via `overflow`
    original = zero.step
    params = [p for group in zero.param_groups for p in group["params"]]

    def guarded_step(*args, **kwargs):
        zero.overflow, norm = skip(params)
        if zero.overflow:
            return None
        if clip_norm > 0:
            torch.nn.utils.clip_grads_with_norm_(params, clip_norm, norm)
        return original(*args, **kwargs)

    zero.overflow = False
    zero.step = guarded_step
