"""The memory plan (`vdvae-dist plan`) of every paper preset, as markdown tables for
benchmarks/RESULTS.md: activations per checkpointing mode, and the largest micro-batch per
GPU that fits each GPU setting (best ZeRO stage), with the peak at micro-batch 1.

Activations are measured once per preset (a real CPU step where `plan --method auto` takes
one, fake tensors otherwise) and reused for every setting.

    python benchmarks/memory_plan.py                       # every paper preset, bf16
    python benchmarks/memory_plan.py --presets ffhq256 ffhq1024 --settings 1x24GB 8x80GB
    python benchmarks/memory_plan.py --precision fp32      # GPUs without native bf16 (V100)
"""
from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

# Efficient-VDVAE's presets and openai/vdvae's (design=original); tiny and mnist-small are ours
PAPER_PRESETS = ("mnist", "cifar10", "imagenet32", "imagenet64", "celeba64", "ffhq256", "ffhq256-5bit", "ffhq1024",
                 "vdvae-cifar10", "vdvae-imagenet32", "vdvae-imagenet64", "vdvae-ffhq256", "vdvae-ffhq1024")
GiB = 2**30


def setting(text: str) -> tuple[int, str]:
    """'8x80GB' -> (8, '80GB')."""
    gpus, _, memory = text.partition("x")
    if not gpus.isdigit() or int(gpus) < 1 or not memory:
        raise argparse.ArgumentTypeError(f"setting {text!r}; allowed: GPUSxMEMORY, e.g. 1x24GB or 8x80GB")
    return int(gpus), memory


def cpu_name() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def best(plan) -> dict[str, tuple[int, int]]:
    """{mode: (largest micro-batch, the lowest ZeRO stage reaching it; when nothing fits,
    the stage with the smallest peak)}."""
    fits, peaks = plan.fits(), plan.peaks(1)
    out = {}
    for mode in fits[0]:
        top = max(fits[s][mode] for s in fits)
        stage = (min(s for s in fits if fits[s][mode] == top) if top else min(peaks, key=lambda s: peaks[s][mode]))
        out[mode] = (top, stage)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", default=PAPER_PRESETS)
    p.add_argument("--settings", nargs="+", type=setting, default=[setting(s) for s in ("1x24GB", "8x24GB", "8x80GB")],
                   help="GPUSxMEMORY per column group, e.g. 1x24GB 8x80GB")
    p.add_argument("--precision", choices=("auto", "bf16", "fp32"), help="default: each preset's engine.precision")
    p.add_argument("--method", choices=("auto", "real", "fake"), default="auto")
    args = p.parse_args(argv)

    import torch

    from vdvae_dist.config import load
    from vdvae_dist.plan.memory_plan import (Budget, build_plan, fmt_bytes, measure_activations, parse_memory,
                                               plan_precision)

    print(f"machine: {cpu_name()}, torch {torch.__version__} ({torch.backends.cpu.get_cpu_capability()}); "
          f"budget per GPU: memory x 0.9 - 1 GiB (plan's defaults)", flush=True)
    plans = {}
    for name in args.presets:
        cfg = load(name)
        bf16, _ = plan_precision(cfg, args.precision)
        t = time.perf_counter()
        acts = measure_activations(cfg, bf16, args.method)
        print(f"{name}: activations measured in {time.perf_counter() - t:.0f} s "
              f"({', '.join(f'{a.mode}: {a.method}' for a in acts)})", file=sys.stderr, flush=True)
        plans[name] = [build_plan(cfg, gpus, Budget(parse_memory(mem), GiB, 0.1), args.precision, activations=acts)
                       for gpus, mem in args.settings]

    first = {name: ps[0] for name, ps in plans.items()}
    print("\nActivations per GPU (G = GiB, M = MiB): at micro-batch 1, and per added image\n")
    print("| preset | parameters | precision | none | selective | full | method |")
    print("|---|---|---|---|---|---|---|")
    for name, plan in first.items():
        cells = [f"{fmt_bytes(a.at(1))} + {fmt_bytes(a.slope)}/img" for a in plan.activations]
        methods = sorted({a.method for a in plan.activations})
        print(f"| {name} | {plan.params / 1e6:.1f}M | {'bf16' if plan.bf16 else 'fp32'} | " + " | ".join(cells)
              + f" | {', '.join(methods)} |")

    heads = [f"{g}x{m}" for g, m in args.settings]
    print("\nLargest micro-batch per GPU, none / selective / full checkpointing (lowest ZeRO stage that "
          "reaches it in brackets), and the peak at micro-batch 1 with that stage (0 = does not fit)\n")
    print("| preset | " + " | ".join(heads) + " |")
    print("|---|" + "---|" * len(heads))
    for name, ps in plans.items():
        cells = []
        for plan in ps:
            b, peaks = best(plan), plan.peaks(1)
            cells.append(" / ".join(f"{n} (z{s}, {fmt_bytes(peaks[s][mode])})" for mode, (n, s) in b.items()))
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
