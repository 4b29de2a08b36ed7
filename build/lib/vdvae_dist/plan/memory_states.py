"""Per-GPU bytes of the model states under DeepSpeed ZeRO stages 0-3, as the pinned
DeepSpeed (0.19.8) lays them out for our engine config (engine/config.py), next to
DeepSpeed's own estimators where they apply.

What DeepSpeed keeps per rank (P parameters, N ranks, lp = 2 bytes in bf16, 4 in fp32):
- stage 0, bf16 (FP16_UnfusedOptimizer): bf16 weights and gradients, an fp32 master copy,
  fp32 gradient copies made for the step; fp32 without ZeRO: DeepSpeed steps our torch
  optimizer on the weights themselves (no copies).
- stage 1 (DeepSpeedZeroOptimizer, gradients not partitioned): full lp weights and
  gradients; this rank's partition of the gradients (contiguous_gradients), of the fp32
  master weights, of their fp32 gradients and of the optimizer state.
- stage 2: as stage 1 but the full lp gradients are reduced away during backward.
- stage 3: everything partitioned; parameters at or below stage3_param_persistence_threshold
  stay whole on every rank; gathered layers in flight; in fp32 the lp partition is the
  master (no copy).
- Adamax keeps two fp32 states per parameter (exp_avg, exp_inf), as Adam does (which
  DeepSpeed's estimators assume); the EMA (engine/sharded_ema.py) is one fp32 copy of
  this rank's share of the weights: full at stage 0, the fp32 partition at stages 1-3.
- buffers: stages 1-3 allocate a reduce bucket of reduce_bucket_size elements in lp
  (contiguous_gradients; twice with overlap_comm at stages 1-2); stage 0 flattens up to
  MEMORY_OPT_ALLREDUCE_SIZE gradient elements for each all-reduce; stage 3 gathers layers
  (DeepSpeed's estimator reserves 4 bytes x the largest layer's parameters).
Sums are conservative: the fp32 gradient copies and stage 0's all-reduce buffer exist only
in the optimizer step, after the backward pass has freed the activations (DeepSpeed's
estimators add them up the same way). Offload (engine.offload_*) is not modelled."""
from __future__ import annotations

import contextlib
import math
import sys
from dataclasses import asdict, dataclass

import torch

STAGES = (0, 1, 2, 3)
FP32 = 4
ADAMAX_STATES = 2  # exp_avg and exp_inf, fp32 each


def _import_deepspeed() -> None:
    """DeepSpeed's logger writes to the stdout of its import: bind it to stderr so that
    stdout stays the plan's (`plan --json`)."""
    if "deepspeed" not in sys.modules:
        with contextlib.redirect_stdout(sys.stderr):
            import deepspeed  # noqa: F401


@dataclass(frozen=True)
class ModelShape:
    params: int  # total parameters
    largest_layer: int  # most parameters any one module holds directly (DeepSpeed's definition)
    persistent: int  # parameters of tensors at or below stage 3's persistence threshold

    @classmethod
    def of(cls, model_cfg, persistence_threshold: int) -> "ModelShape":
        from ..model import build_model

        with torch.device("meta"):  # shapes only
            model = build_model(model_cfg)
        # DeepSpeed's model_to_params deduplicates by data_ptr, which is 0 for every meta tensor
        largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
        sizes = [p.numel() for p in model.parameters()]
        return cls(sum(sizes), largest, sum(n for n in sizes if n <= persistence_threshold))


@dataclass(frozen=True)
class DeepSpeedDefaults:
    """The buffer sizes DeepSpeed will use with our engine config (its own defaults)."""

    reduce_bucket_size: int
    overlap_comm_stage12: bool
    contiguous_gradients: bool
    persistence_threshold: int
    allreduce_size: int

    @classmethod
    def of(cls, cfg, gpus: int, bf16: bool) -> "DeepSpeedDefaults":
        from dataclasses import replace

        _import_deepspeed()
        from deepspeed.runtime.engine import MEMORY_OPT_ALLREDUCE_SIZE
        from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

        from ..engine.config import deepspeed_config

        def zero(stage: int):
            # any batch the ranks divide: the batch does not change the buffers
            c = replace(cfg, engine=replace(cfg.engine, zero_stage=stage, micro_batch_size=0),
                        optim=replace(cfg.optim, batch_size=gpus))
            return DeepSpeedZeroConfig(**deepspeed_config(c, gpus, bf16)["zero_optimization"])

        z2, z3 = zero(2), zero(3)
        return cls(z2.reduce_bucket_size, bool(z2.overlap_comm), z2.contiguous_gradients,
                   z3.param_persistence_threshold, MEMORY_OPT_ALLREDUCE_SIZE)


@dataclass(frozen=True)
class States:
    stage: int
    params: int  # weights in the training precision held by this rank
    grads: int  # gradients: lp ones and the fp32 copies the optimizer steps on
    optimizer: int  # fp32 master weights (where separate) + the two Adamax states
    ema: int  # our fp32 EMA share
    buffers: int  # DeepSpeed's communication / gathering buffers
    deepspeed_estimate: int | None  # DeepSpeed's estimator, per GPU, where it applies
    deepspeed_estimator: str  # which one, or why none applies

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer + self.ema + self.buffers

    def as_dict(self) -> dict:
        return asdict(self) | {"total": self.total}


def model_states(shape: ModelShape, ds: DeepSpeedDefaults, stage: int, gpus: int, bf16: bool) -> States:
    """Bytes per GPU at ZeRO `stage` on `gpus` data-parallel ranks."""
    if stage not in STAGES:
        raise ValueError(f"ZeRO stage {stage} is out of range; allowed: 0 | 1 | 2 | 3")
    if gpus < 1:
        raise ValueError(f"--gpus={gpus} is out of range; allowed: >= 1")
    P, lp = shape.params, 2 if bf16 else FP32
    part = math.ceil(P / gpus)  # this rank's partition (DeepSpeed pads the flat groups)
    adamax = ADAMAX_STATES * FP32
    bucket = ds.reduce_bucket_size * lp if ds.contiguous_gradients else 0
    if stage == 0:
        separate_master = bf16  # fp32 stage 0: the torch optimizer steps the weights themselves
        params, grads = lp * P, lp * P + (FP32 * P if separate_master else 0)
        optimizer = (FP32 * P if separate_master else 0) + adamax * P
        ema, buffers = FP32 * P, min(P, ds.allreduce_size) * lp
    elif stage in (1, 2):
        full_grads = lp * P if stage == 1 else 0
        params, grads = lp * P, full_grads + lp * part + FP32 * part
        optimizer, ema = FP32 * part + adamax * part, FP32 * part
        buffers = bucket * (2 if ds.overlap_comm_stage12 else 1)
    else:
        params = lp * (math.ceil((P - shape.persistent) / gpus) + shape.persistent)
        # the lp gradient partition (grad_partitions_flat_buffer) and its flattened fp32 copy
        grads = lp * part + FP32 * part
        optimizer = (FP32 * part if bf16 else 0) + adamax * part  # fp32: the partition is the master
        ema, buffers = FP32 * part, bucket + 2 * lp * shape.largest_layer
    estimate, estimator = deepspeed_estimate(shape, stage, gpus, bf16)
    return States(stage, params, grads, optimizer, ema, buffers, estimate, estimator)


def deepspeed_estimate(shape: ModelShape, stage: int, gpus: int, bf16: bool) -> tuple[int | None, str]:
    """DeepSpeed's per-GPU estimate of params + gradients + optimizer states (no offload).
    Its estimators assume 16-bit weights and gradients with fp32 masters and Adam's two
    states; they leave out the EMA and the reduce buckets."""
    if not bf16:
        return None, "none: DeepSpeed's estimators assume 16-bit weights and gradients"
    _import_deepspeed()
    if stage == 2:
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

        _, gpu = estimate_zero2_model_states_mem_needs(shape.params, num_gpus_per_node=gpus, cpu_offload=False)
        return gpu, "estimate_zero2_model_states_mem_needs"
    if stage == 3:
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

        _, gpu, _ = estimate_zero3_model_states_mem_needs(shape.params, shape.largest_layer, num_gpus_per_node=gpus,
                                                          cpu_offload=False, cpu_offload_params=False)
        return gpu, "estimate_zero3_model_states_mem_needs"
    return None, "none: DeepSpeed has estimators for stages 2 and 3 only"
