"""The update rule on plain torch (one process, CPU or one GPU): optimizer and LR
schedule, pre-clip global gradient norm, gradient skipping (non-finite or above the
threshold), clipping, EMA; bf16 through autocast (the loss stays fp32)."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from ..artifacts.run_folder import EXPORT_NAME, TORCH_STATE_FILE, load_torch_state
from ..artifacts.weights import save_export
from ..config import RunConfig
from ..core.placement import device_of, memory_format_of
from ..core.precision import autocast
from ..core.precision import resolve as resolve_precision
from .compiled import compile_blocks
from .ema import EMA
from .rule import (Outcome, batch_split, clips, count_update, counters, make_optimizer, restore_counters,
                   should_skip)
from .schedules import lr_at


class TorchRule:
    def __init__(self, model: nn.Module, cfg: RunConfig, device: torch.device):
        self.cfg = cfg
        self.precision = resolve_precision(cfg.engine.precision, device)
        self.bf16 = self.precision.bf16
        # channels_last suits both cuDNN and oneDNN convolutions; batches follow it
        self.module = model.to(device).to(memory_format=torch.channels_last)
        # read back: torch.device("cuda") != the "cuda:0" its tensors report
        self.device, self.memory_format = device_of(self.module), memory_format_of(self.module)
        self.micro_batch, self.accumulation = batch_split(cfg, 1)
        self.params = [p for p in self.module.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(self.params, cfg.optim)
        self.step = 0  # optimizer steps attempted (applied + skipped)
        self.skipped = 0
        self.consecutive_skips = 0
        self.ema = EMA(self.module, cfg.optim.ema_decay, cfg.optim.ema_decay_float32)
        self.compiled = compile_blocks(self.module, cfg.engine.compile)

    def forward(self, micro_uint8: torch.Tensor):
        self.module.train()
        with autocast(self.device, self.bf16):
            return self.module(micro_uint8)

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        # gradients of equal micro-batches add up; dividing keeps them those of the mean
        (loss / self.accumulation).backward()

    def apply(self) -> Outcome:
        """Call after the last backward() of an update: clips, then applies or skips it (both
        decided on the pre-clip norm, as both official codes do), then the EMA."""
        o = self.cfg.optim
        grads = [p.grad for p in self.params if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads, foreach=True) if grads else torch.zeros(())
        grad_norm = float(norm)  # the one host sync per step: the skip decision needs it
        lr = lr_at(self.step, o)
        clipped, after_clip = clips(grad_norm, o), grad_norm
        if clipped:
            torch.nn.utils.clip_grads_with_norm_(self.params, o.clip_norm, norm, foreach=True)
            after_clip = float(torch.nn.utils.get_total_norm([p.grad for p in self.params if p.grad is not None]))
        skipped = should_skip(grad_norm, o)
        if not skipped:
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            self.optimizer.step()
            self.ema.update(self.module)
        self.optimizer.zero_grad(set_to_none=True)
        count_update(self, skipped, grad_norm, o)
        return Outcome(grad_norm, skipped, lr, clipped, after_clip)

    def ema_weights(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().clone() for k, v in self.ema.state_dict().items()}

    def save(self, folder: Path, client_state: dict) -> None:
        torch.save({"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                    "ema": self.ema.state_dict(), "rule": counters(self), "client": client_state}, Path(folder) / TORCH_STATE_FILE)
        save_export(Path(folder) / EXPORT_NAME, self.cfg, self.ema_weights(), self.step)

    def load(self, folder: Path) -> dict:
        state = load_torch_state(folder, self.device)
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.ema.load_state_dict(state["ema"])
        restore_counters(self, state["rule"])
        return state["client"]

