"""The one place where batches move to a network's device and memory layout, and the
check that none arrives anywhere else (DeepSpeed moves the model, never the inputs)."""
from __future__ import annotations

import torch
import torch.nn as nn


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


def memory_format_of(module: nn.Module) -> torch.memory_format:
    """The layout of the module's convolution weights: channels_last if a 4-D weight is
    stored that way (and not also plain contiguous, as 1x1 kernels are), else contiguous.
    ZeRO re-views parameters into flat buffers, so this is read after wrapping."""
    for p in module.parameters():
        if p.dim() == 4 and p.numel() > 0 and not p.is_contiguous():
            if p.is_contiguous(memory_format=torch.channels_last):
                return torch.channels_last
    return torch.contiguous_format


def device_of(module: nn.Module) -> torch.device:
    return next(module.parameters()).device
