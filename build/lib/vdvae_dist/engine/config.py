"""The typed config translated into a DeepSpeed config dict (no DeepSpeed import)."""
from __future__ import annotations

from ..config.schema import RunConfig
from ..train.rule import batch_split


def plain_torch_optimizer(cfg: RunConfig, bf16: bool) -> bool:
    """Stage 0 in fp32: DeepSpeed steps the torch optimizer itself (no clipping, no skipping)."""
    return cfg.engine.zero_stage == 0 and not bf16


def deepspeed_config(cfg: RunConfig, world: int, bf16: bool) -> dict:
    """`bf16`: engine.precision as resolved on the training device (core/precision.py)."""
    e, o = cfg.engine, cfg.optim
    if e.zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"engine.zero_stage={e.zero_stage} is out of range; allowed: 0 | 1 | 2 | 3")
    micro, accumulation = batch_split(cfg, world)
    zero: dict = {"stage": e.zero_stage}
    if e.zero_stage in (1, 2):
        zero["elastic_checkpoint"] = True  # re-partitionable optimizer state
    if e.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    if e.offload_params:
        zero["offload_param"] = {"device": "cpu"}
    return {
        "train_batch_size": o.batch_size,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accumulation,
        # 0 disables clipping; fp32 stage 0 clips in our step guard, after the skip decision
        "gradient_clipping": 0.0 if plain_torch_optimizer(cfg, bf16) else o.clip_norm,
        # skipping non-finite bf16 steps is DeepSpeed's own check: stated, not left to its default
        "bf16": {"enabled": bf16, "check_grad_overflow": True},
        "zero_optimization": zero,
        # our torch optimizer (Adamax/AdamW) avoids minutes of JIT op builds on CPU
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**12,
        "wall_clock_breakdown": False,
    }
