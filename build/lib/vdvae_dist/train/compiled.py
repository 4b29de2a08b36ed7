"""engine.compile: torch.compile applied block by block, with a fallback to eager.

Each encoder cell and top-down block is compiled on its own ("regional" compilation):
blocks of one resolution share their compiled code (torch treats parameters as inputs),
so compile time grows with the number of resolutions, not of blocks, and the fused
elementwise work (activations, softplus, reparameterisation, KL, residual adds) sits next
to the convolutions it surrounds. `reduce-overhead` adds CUDA graphs on GPUs, where the
many small low-resolution blocks are launch-bound; on CPU it behaves like `default`.

Shapes are static (`dynamic=False`): a training run has one micro-batch size, and the
blocks draw latent noise with explicit shapes, which symbolic shapes do not support.

If compilation fails (no C++ compiler, an unsupported op on some device), the block whose
first call failed and all others go back to eager, the reason is kept, and training goes
on: a failure in a block's forward happens before it changed any state.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch._dynamo.exc import TorchDynamoException

from ..model.blocks import EncoderCell, TopDownBlock


def _options(mode: str) -> dict:
    """The inductor options of torch.compile's `mode` (it takes a mode or options, not both),
    plus latent noise from torch's own generator, as in eager: the seeded noise per
    micro-batch (same draws on any worker count, resumed runs replay) must not depend on
    compiling."""
    from torch._inductor import list_mode_options

    return {**list_mode_options(mode), "fallback_random": True}


class CompiledBlocks:
    def __init__(self, module: nn.Module, mode: str):
        self.mode = mode
        self.blocks = [m for m in module.modules() if isinstance(m, (EncoderCell, TopDownBlock))]
        self.failure: str | None = None
        options = _options(mode)
        for block in self.blocks:
            # an instance attribute shadows the class's forward; deleting it restores eager
            block.forward = self._guarded(block.forward, torch.compile(block.forward, dynamic=False, options=options))

    def _guarded(self, eager, compiled):
        def forward(*args, **kwargs):
            if self.failure is None:
                try:
                    return compiled(*args, **kwargs)
                except TorchDynamoException as e:
                    self._fall_back(e)
            return eager(*args, **kwargs)

        return forward

    def _fall_back(self, error: Exception) -> None:
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        self.failure = f"{type(error).__name__}: {first_line[:300]}"
        for block in self.blocks:
            vars(block).pop("forward", None)

    def describe(self) -> str:
        if self.failure is not None:
            return f"compile: off (engine.compile={self.mode} failed, training in eager: {self.failure})"
        return f"compile: {self.mode} ({len(self.blocks)} blocks, each compiled on its own)"


def compile_blocks(module: nn.Module, mode: str) -> CompiledBlocks | None:
    """Compile the blocks of `module` in place for engine.compile=`mode`; None when off."""
    return None if mode == "off" else CompiledBlocks(module, mode)
