"""The typed config translated into a DeepSpeed config dict, with the user's own DeepSpeed
settings (engine.deepspeed) merged in, and that dict checked by DeepSpeed's config reader
before any worker starts."""
from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

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
    generated = {
        "train_batch_size": o.batch_size,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accumulation,
        # 0 disables clipping; fp32 stage 0 clips in our step guard, after the skip decision
        "gradient_clipping": 0.0 if plain_torch_optimizer(cfg, bf16) else o.clip_norm,
        # skipping non-finite bf16 steps is DeepSpeed's own check: stated, not left to its default
        "bf16": {"enabled": bf16, "check_grad_overflow": True},
        "zero_optimization": zero,
        # our torch optimizer (Adamax/AdamW) avoids minutes of JIT op builds on CPU; with
        # offload DeepSpeed would otherwise refuse it and demand its own CPU Adam
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**12,
        "wall_clock_breakdown": False,
    }
    return merged(generated, e.deepspeed)


def merged(base: Mapping[str, Any], extra: Mapping[str, Any]) -> dict:
    """`base` with `extra` laid over it: tables merge key by key, other values replace."""
    out = copy.deepcopy(dict(base))
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merged(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


class _ReadKeys:
    """`key in table.keys()` as DeepSpeed writes it, noted as a read."""

    def __init__(self, table: "_RecordingTable"):
        self.table = table

    def __contains__(self, key) -> bool:
        self.table.reads.add(key)
        return dict.__contains__(self.table, key)

    def __iter__(self):
        return iter(dict.keys(self.table))

    def __len__(self) -> int:
        return dict.__len__(self.table)


class _RecordingTable(dict):
    """A top-level config table that notes every key DeepSpeed's reader asks for; the copy
    DeepSpeed makes shares the same set of reads."""

    def __init__(self, items: Mapping, reads: set):
        super().__init__(items)
        self.reads = reads

    def get(self, key, default=None):
        self.reads.add(key)
        return super().get(key, default)

    def __getitem__(self, key):
        self.reads.add(key)
        return super().__getitem__(key)

    def __contains__(self, key) -> bool:
        self.reads.add(key)
        return super().__contains__(key)

    def pop(self, key, *default):
        self.reads.add(key)
        return super().pop(key, *default)

    def keys(self):
        return _ReadKeys(self)


def check_with_deepspeed(cfg: RunConfig) -> dict:
    """The DeepSpeed config of `cfg` read by DeepSpeed's own reader (its pydantic models for
    ZeRO, activation checkpointing, monitors...), so a wrong engine.deepspeed setting fails on
    the driver, naming it, instead of in every worker. A top-level key the reader never looks
    at (a typo, or a setting of another DeepSpeed release) is refused too: DeepSpeed would
    silently ignore it. Returns the checked config (for world size 1: the batch keys are
    checked again by deepspeed.initialize on the real world size)."""
    from deepspeed.runtime.config import DeepSpeedConfig, DeepSpeedConfigError
    from pydantic import ValidationError

    config = deepspeed_config(cfg, 1, cfg.engine.precision == "bf16")
    # without a process group DeepSpeed assumes one rank: let it derive the global batch
    del config["train_batch_size"]
    reads: set = set()
    try:
        DeepSpeedConfig(_RecordingTable(config, reads))
    except (ValidationError, DeepSpeedConfigError, ValueError, AssertionError, TypeError) as error:
        first = str(error).strip().splitlines()
        raise ValueError(f"engine.deepspeed={cfg.engine.deepspeed!r} is out of range; DeepSpeed's config reader "
                         f"refuses it: {' | '.join(first[:4])}") from None
    unread = sorted(set(cfg.engine.deepspeed) - reads)
    if unread:
        raise ValueError(f"engine.deepspeed.{unread[0]} is out of range; allowed: a setting DeepSpeed's config reader "
                         f"uses (it never reads {', '.join(unread)}: a misspelt key, or one of another DeepSpeed "
                         "release, would be silently ignored)")
    return config
