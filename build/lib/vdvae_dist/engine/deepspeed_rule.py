"""The update rule on DeepSpeed ZeRO (stages 0-3): the model wrapped by a DeepSpeed
engine, gradient skipping through engine/hooks.py, the sharded EMA, checkpoints through
engine/zero_checkpoint.py. DeepSpeed moves the model to its device, never the inputs: the
training loop places batches on `device` (train/step.py through core/placement.py)."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from ..config.schema import RunConfig
from ..core.placement import memory_format_of
from ..core.precision import resolve as resolve_precision
from ..train.compiled import compile_blocks
from ..train.rule import Outcome, batch_split, clips, count_update, make_optimizer
from ..train.schedules import lr_at
from . import hooks, zero_checkpoint
from .config import deepspeed_config
from .sharded_ema import ShardedEMA, fp32_masters


def set_fp32_masters(engine, stage: int, weights: dict[str, torch.Tensor]) -> None:
    """The fp32 master copy of every parameter set to `weights` (collective at stage 3)."""
    if stage == 0:  # replicated: the masters of the bf16 module parameters, on every rank
        masters = fp32_masters(engine)
        for name, p in engine.module.named_parameters():
            masters[id(p)].data.copy_(weights[name])
        return
    from deepspeed.utils import safe_set_full_fp32_param

    for name, p in engine.module.named_parameters():
        safe_set_full_fp32_param(p, weights[name].to(engine.device))


class DeepSpeedRule:
    def __init__(self, model: nn.Module, cfg: RunConfig, world: int):
        import deepspeed
        from deepspeed.accelerator import get_accelerator

        hooks.check_version(cfg.engine.allow_untested_deepspeed)
        if not cfg.optim.gradient_skip:
            raise ValueError("optim.gradient_skip=false is out of range with DeepSpeed; allowed: true (DeepSpeed "
                             "always skips a step whose gradient is not finite); train in one process to never skip")
        self.cfg, self.stage, self.world = cfg, cfg.engine.zero_stage, world
        self.micro_batch, self.accumulation = batch_split(cfg, world)
        # decided on the device DeepSpeed will train on, before it casts the module
        self.precision = resolve_precision(cfg.engine.precision, torch.device(get_accelerator().current_device_name()))
        self.bf16 = self.precision.bf16
        optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad], cfg.optim)
        # DeepSpeed casts the module to bf16 before it builds the fp32 masters from it: given
        # weights (train.init_from) are written back into the masters exactly, below
        given = ({n: p.detach().float().clone() for n, p in model.named_parameters()}
                 if self.bf16 and cfg.train.init_from else None)
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                                    config=deepspeed_config(cfg, world, self.bf16))
        if given is not None:
            set_fp32_masters(self.engine, self.stage, given)
        zero_checkpoint.weights_only_reads(self.engine)
        self.module = self.engine.module
        self.device = torch.device(self.engine.device)
        self.memory_format = memory_format_of(self.module)  # ZeRO's flat buffers: usually contiguous
        self.step, self.skipped, self.consecutive_skips = 0, 0, 0
        self.probe = hooks.NormProbe(cfg.optim.skip_threshold)
        hooks.install(self.engine, self.stage, cfg.optim.clip_norm, self.probe)
        self.ema = ShardedEMA(self.engine, cfg.optim.ema_decay, self.stage, cfg.optim.ema_decay_float32)
        self.compiled = compile_blocks(self.module, cfg.engine.compile)  # on the device, in its dtype

    def forward(self, micro_uint8: torch.Tensor):
        self.engine.train()
        return self.engine(micro_uint8)  # the engine casts the module to bf16 when enabled

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        self.engine.backward(loss)  # scales by 1 / accumulation
        if not last:
            self.engine.step()  # DeepSpeed's accumulation bookkeeping; updates only at the boundary

    def apply(self) -> Outcome:
        """Call after the last backward() of an update: sets the LR, steps (or skips),
        updates the EMA."""
        o = self.cfg.optim
        lr = lr_at(self.step, o)
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr
        self.probe.reset()
        self.engine.step()
        skipped = not self.engine.was_step_applied()
        self.probe.require_called(step_applied=not skipped)
        grad_norm = self.probe.norm if self.probe.called else float("inf")
        if not skipped:
            self.ema.update()
        count_update(self, skipped, grad_norm, o)
        return Outcome(grad_norm, skipped, lr, clips(grad_norm, o))

    def ema_weights(self) -> dict[str, torch.Tensor]:
        return self.ema.full_state_dict()

    def save(self, folder: Path, client_state: dict) -> None:
        zero_checkpoint.save(self, Path(folder), client_state)

    def load(self, folder: Path) -> dict:
        return zero_checkpoint.load(self, Path(folder))
