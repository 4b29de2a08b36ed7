"""engine.precision resolved on the device that computes (bf16 only where it is native),
and the autocast every forward pass runs under.

A CPU without AVX512-BF16 or AMX emulates bf16 matrix products hundreds of times slower
than fp32 (measured on AVX2-only EPYCs), and GPUs before compute capability 8.0 emulate it
too; "auto" therefore picks bf16 only on hardware that computes it natively."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch

NATIVE_CPU_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo names


@dataclass(frozen=True)
class Capabilities:
    """What the device offers for bf16 (injected in tests)."""

    device_type: str  # "cuda", "cpu", ...
    name: str  # GPU or CPU model, for the message
    native_bf16: bool


@dataclass(frozen=True)
class Precision:
    name: str  # "bf16" | "fp32"
    reason: str

    @property
    def bf16(self) -> bool:
        return self.name == "bf16"

    def __str__(self) -> str:
        return f"{self.name} ({self.reason})"


def _cpu_flags_and_model() -> tuple[set[str], str]:
    flags, model = set(), "CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "flags" and not flags:
                flags = set(value.split())
            elif key.strip() == "model name" and model == "CPU":
                model = value.strip()
    except OSError:  # not Linux: no flags known, so "auto" stays fp32 on the CPU
        pass
    return flags, model


def capabilities(device: torch.device) -> Capabilities:
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return Capabilities("cuda", torch.cuda.get_device_name(index),
                            torch.cuda.is_bf16_supported(including_emulation=False))
    if device.type == "cpu":
        flags, model = _cpu_flags_and_model()
        return Capabilities("cpu", model, any(f in flags for f in NATIVE_CPU_FLAGS))
    return Capabilities(device.type, device.type, False)


def choose(setting: str, caps: Capabilities) -> Precision:
    """The precision engine.precision=setting gives on a device with these capabilities."""
    where = f"{caps.device_type} {caps.name}"
    native = ("bf16 is native" if caps.native_bf16 else
              "no native bf16 (CPU without AVX512-BF16/AMX, or a GPU before compute capability 8.0)")
    if setting == "fp32":
        return Precision("fp32", "engine.precision=fp32")
    if setting == "bf16":
        return Precision("bf16", "engine.precision=bf16" + ("" if caps.native_bf16 else
                                                            f"; {where}: {native}, expect it to be slow"))
    if setting != "auto":
        raise ValueError(f"engine.precision={setting!r} is unknown; allowed: auto | fp32 | bf16")
    return Precision("bf16" if caps.native_bf16 else "fp32", f"auto: {where}: {native}")


def resolve(setting: str, device: torch.device) -> Precision:
    return choose(setting, capabilities(device))


def autocast(device: torch.device, bf16: bool):
    """bf16 autocast on `device`, or nothing (fp32): the one context every forward pass of
    training, evaluation and serving runs under."""
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
