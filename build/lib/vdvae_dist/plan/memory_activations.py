"""Activation memory of one training step, per image, measured two ways:

- "real": a real forward + backward on this CPU, in a child process; the number is the rise
  of its peak resident memory (VmHWM, reset through /proc/self/clear_refs) over the
  resident memory before the step. glibc's mmap threshold is fixed so freed tensors go
  back to the OS and resident memory follows live tensors, as a GPU allocator's would.
- "fake": the same step on fake tensors (FakeTensorMode: shapes and dtypes, no data), with
  the peak of live tensor storage counted at the dispatcher (live_memory.LiveBytes). Any
  preset fits, in seconds.

Both count what the step needs above the parameters and gradients (those are model states,
sized per ZeRO stage in memory_states.py): gradients exist before the measured step, as they
do in training. The network runs as DeepSpeed runs it: the module in the training precision
(bf16: cast, like the engine does), the loss in fp32 (train/objective.py)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass

import torch

MODES = ("none", "selective", "full")
BATCHES = (1, 2)  # measured micro-batches; the line through them extrapolates
# "auto" measures on the CPU only up to this many FLOP per mode (warm-up and measured
# steps at each of BATCHES): ~30 s at the ~100 GFLOP/s of a 2-core CPU, e.g. cifar10 and
# imagenet32, not the 64 px and larger presets.
REAL_FLOP_LIMIT = 3e12
METHODS = {"real": "real CPU step (peak resident memory)",
           "fake": "fake tensors (peak live tensor storage)"}


@dataclass(frozen=True)
class ActivationFit:
    """Activation bytes of one step at micro-batch b: intercept + slope * b, a line through
    the measurements at BATCHES (slope: bytes per image; intercept: what does not scale
    with the batch, e.g. per-step temporaries)."""

    mode: str
    method: str  # a key of METHODS
    measured: tuple[int, ...]  # bytes at each of BATCHES

    @property
    def slope(self) -> int:
        return self.measured[1] - self.measured[0]

    @property
    def intercept(self) -> int:
        return self.measured[0] - self.slope * BATCHES[0]

    def at(self, batch: int) -> int:
        return self.intercept + self.slope * batch


def with_mode(cfg, mode: str):
    """`cfg` with model.checkpoint_activations=mode."""
    from dataclasses import replace

    if mode not in MODES:
        raise ValueError(f"checkpointing mode {mode!r} is unknown; allowed: {' | '.join(MODES)}")
    return replace(cfg, model=replace(cfg.model, checkpoint_activations=mode))


def _build(cfg, bf16: bool):
    from ..model import build_model

    model = build_model(cfg.model)
    if bf16:  # the DeepSpeed engine casts the module
        model = model.to(torch.bfloat16)
    model.train()
    for p in model.parameters():  # gradients exist from the previous step
        p.grad = torch.zeros_like(p)
    return model


def _step(model, batch: int, loss_cfg) -> None:
    from ..train.objective import group_sizes, objective

    x = torch.zeros(batch, *model.data_shape, dtype=torch.uint8)
    objective(model(x), 0, loss_cfg, group_sizes(model)).loss.backward()


def _model_tensors(model) -> list[torch.Tensor]:
    return [t for p in model.parameters() for t in (p, p.grad) if t is not None] + list(model.buffers())


def _fake_model(cfg, bf16: bool):
    """The model on fake tensors (call inside FakeTensorMode)."""
    # Module.to() cannot swap fake parameters (they carry weak references): build in bf16
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16 if bf16 else torch.float32)
    try:
        return _build(cfg, False)
    finally:
        torch.set_default_dtype(previous)


def fake_bytes(cfg, batch: int, bf16: bool) -> int:
    """Peak live tensor bytes of one step above parameters and gradients, on fake tensors."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from .live_memory import LiveBytes

    with FakeTensorMode():
        model = _fake_model(cfg, bf16)
        live = LiveBytes()
        live.track(_model_tensors(model))
        base = live.current
        with live:
            _step(model, batch, cfg.loss)
    return live.peak - base


def fake_flops(cfg, batch: int, bf16: bool) -> int:
    """FLOP of one step (recomputation included), counted on fake tensors."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode

    with FakeTensorMode():
        model = _fake_model(cfg, bf16)
        with FlopCounterMode(display=False) as counter:
            _step(model, batch, cfg.loss)
    return counter.get_total_flops()


# -- real steps, in a child process ---------------------------------------------------

def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M).group(1))


def _real_child(cfg_json: str, bf16: bool) -> None:
    import gc

    from ..config import from_dict

    cfg = from_dict(json.loads(cfg_json))
    torch.manual_seed(0)
    model = _build(cfg, bf16)
    for batch in BATCHES:  # warm-up: lazy initialisations, kernel caches for each shape
        _step(model, batch, cfg.loss)
    out = []
    for batch in BATCHES:
        gc.collect()
        before = _status_kib("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets the peak (VmHWM) to the current resident size
        _step(model, batch, cfg.loss)
        out.append((_status_kib("VmHWM") - before) * 1024)
    print(json.dumps(out))


def real_bytes(cfg, bf16: bool) -> tuple[int, ...]:
    """Peak resident memory rise of one real step at each of BATCHES (a child process)."""
    from ..config import to_dict

    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="4096", MALLOC_TRIM_THRESHOLD_="0")
    code = "import sys; from vdvae_dist.plan.memory_activations import _real_child as c; c(sys.argv[1], sys.argv[2] == '1')"
    done = subprocess.run([sys.executable, "-c", code, json.dumps(to_dict(cfg)), "1" if bf16 else "0"],
                          env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"the real measurement step failed:\n{done.stderr[-2000:]}")
    return tuple(json.loads(done.stdout.strip().splitlines()[-1]))


def available_ram() -> int:
    return _meminfo_kib("MemAvailable") * 1024


def _meminfo_kib(field: str) -> int:
    with open("/proc/meminfo") as f:
        return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M).group(1))


def measure(cfg, mode: str, bf16: bool, method: str, ram_budget: int) -> ActivationFit:
    """Activation fit for one checkpointing mode. method: real | fake | auto (real when
    real_step_feasible, else fake)."""
    if method not in ("auto", *METHODS):
        raise ValueError(f"--method={method!r} is unknown; allowed: auto | {' | '.join(METHODS)}")
    c = with_mode(cfg, mode)
    fake = tuple(fake_bytes(c, b, bf16) for b in BATCHES)
    if method == "fake" or (method == "auto" and not real_step_feasible(c, fake[-1], bf16, ram_budget)):
        return ActivationFit(mode, "fake", fake)
    return ActivationFit(mode, "real", real_bytes(c, bf16))


def real_step_feasible(cfg, activation_bytes: int, bf16: bool, ram_budget: int) -> bool:
    """Whether the real measurement suits this CPU: bf16 computed natively (emulated, a
    step takes many minutes); weights, gradients and activations at the largest batch,
    doubled for the allocator and the libraries, within `ram_budget` bytes; at most
    REAL_FLOP_LIMIT of compute."""
    from ..model import build_model, count_parameters
    from ..core.precision import capabilities

    if bf16 and not capabilities(torch.device("cpu")).native_bf16:
        return False
    with torch.device("meta"):
        params = count_parameters(build_model(cfg.model))
    weights = params * (2 if bf16 else 4) * 2  # + gradients
    if 2 * (weights + activation_bytes) > ram_budget:
        return False
    steps = 2 * sum(BATCHES)  # images through forward + backward: warm-up and measured steps
    return steps * fake_flops(cfg, 1, bf16) <= REAL_FLOP_LIMIT
