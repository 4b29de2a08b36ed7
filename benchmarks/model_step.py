"""One training step (forward + backward + update) of the Efficient design vs the
original VDVAE design at the same preset, side by side in one run.

Each variant runs in its own process so peak RSS is its own. Prints the machine (CPU or GPU,
native bf16 or not, what engine.precision=auto picks) and its fp32 and bf16 matmul rates,
then per variant images/s, seconds per step, peak RSS, FLOP per step
(torch.utils.flop_counter on the meta device), the achieved FLOP/s and its fraction of the
matmul rate at that precision, then the Efficient/original ratios and each Efficient variant
against plain fp32: bf16, activation checkpointing (selective, full) and, with --compile MODE,
engine.compile at the best precision (its first step, compiling included, is printed).
bf16 variants run only where bf16 is native unless --dtypes fp32,bf16.

    python benchmarks/model_step.py                    # cifar10 width/depth, batch 8
    python benchmarks/model_step.py --preset tiny --batch 8 --steps 5
    python benchmarks/model_step.py --compile default  # + a torch.compile variant
    python benchmarks/model_step.py --reference PATH   # + the official Efficient-VDVAE step (official_step.py)
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

# (design, dtype, model.checkpoint_activations, engine.compile)
VARIANTS = [("efficient", "bf16", "none", "off"), ("original", "bf16", "none", "off"),
            ("efficient", "fp32", "none", "off"), ("original", "fp32", "none", "off"),
            ("efficient", "fp32", "selective", "off"), ("efficient", "bf16", "selective", "off"),
            ("efficient", "fp32", "full", "off"), ("efficient", "bf16", "full", "off")]


def flops_per_step(cfg, batch: int) -> int:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from vdvae_dist.model import build_model

    with torch.device("meta"):
        model = build_model(cfg.model)
        x = torch.zeros(batch, *model.data_shape, dtype=torch.uint8)
        with FlopCounterMode(display=False) as counter:
            model(x).nelbo.mean().backward()
    return counter.get_total_flops()


def child(args) -> None:
    import torch

    from vdvae_dist.config import load
    from vdvae_dist.model import build_model
    from vdvae_dist.train.objective import group_sizes
    from vdvae_dist.train.step import train_step
    from vdvae_dist.train.torch_rule import TorchRule

    torch.manual_seed(0)
    cfg = load(args.preset, overrides=[f"model.design={args.design}", f"optim.batch_size={args.batch}",
                                       "optim.skip_threshold=0", f"engine.precision={args.dtype}",
                                       f"model.checkpoint_activations={args.ckpt}", f"engine.compile={args.compile}"])
    rule = TorchRule(build_model(cfg.model), cfg, torch.device("cpu"))
    model, sizes = rule.module, group_sizes(rule.module)
    x = torch.randint(0, 256, (args.batch, *model.data_shape), dtype=torch.uint8)
    times, first_s = [], None
    for i in range(args.warmup + args.steps):
        t = time.perf_counter()
        train_step(rule, x, cfg.loss, sizes, seed=0)
        first_s = time.perf_counter() - t if first_s is None else first_s
        if i >= args.warmup:
            times.append(time.perf_counter() - t)
    step_s = sorted(times)[len(times) // 2]
    flops = flops_per_step(cfg, args.batch)
    print(json.dumps({"design": args.design, "dtype": args.dtype, "ckpt": args.ckpt, "step_s": step_s,
                      "first_step_s": first_s, "compile_failure": rule.compiled and rule.compiled.failure,
                      "images_per_s": args.batch / step_s,
                      "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                      "gflop_per_step": flops / 1e9, "gflops": flops / step_s / 1e9,
                      "params": sum(p.numel() for p in model.parameters()), "threads": torch.get_num_threads()}))


def matmul_gflops(dtype, size: int = 2048, budget_s: float = 3.0) -> float:
    """This machine's dense matmul rate at `dtype` (GFLOP/s): repeated size x size products
    for about budget_s; the size shrinks where one product alone would take longer (emulated
    bf16 runs at a few GFLOP/s at best)."""
    import torch

    a = torch.randn(256, 256).to(dtype)
    t = time.perf_counter()
    a @ a
    if time.perf_counter() - t > 0.05:  # very slow kernels: measure at this size
        size = 256
    a = torch.randn(size, size).to(dtype)
    a @ a  # warm-up
    reps, t = 0, time.perf_counter()
    while reps == 0 or time.perf_counter() - t < budget_s:
        a @ a
        reps += 1
    return 2 * size**3 * reps / (time.perf_counter() - t) / 1e9


def machine_report() -> dict[str, float]:
    """Print the CPU/GPU, what engine.precision=auto picks there and the matmul rates; the rates."""
    import platform

    import torch

    from vdvae_dist.core.precision import capabilities, choose

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    caps = capabilities(device)
    rates = {"fp32": matmul_gflops(torch.float32), "bf16": matmul_gflops(torch.bfloat16)}
    print(f"machine: {caps.name} ({platform.machine()}, {torch.get_num_threads()} threads), native bf16: "
          f"{caps.native_bf16}; engine.precision=auto -> {choose('auto', caps)}")
    print(f"matmul rate: fp32 {rates['fp32']:.1f} GFLOP/s, bf16 {rates['bf16']:.1f} GFLOP/s "
          f"(bf16/fp32 x{rates['bf16'] / rates['fp32']:.2f})", flush=True)
    return rates


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="cifar10")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=3, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--design")
    p.add_argument("--dtype")
    p.add_argument("--ckpt", default="none", help="model.checkpoint_activations of one variant")
    p.add_argument("--compile", default="off", help="engine.compile: off | default | ... (a variant with "
                   "engine.compile=default at the best precision is added when not off)")
    p.add_argument("--dtypes", default="auto",
                   help="auto (fp32, and bf16 only where native: emulated bf16 steps take minutes) | fp32,bf16")
    p.add_argument("--reference", metavar="PATH",
                   help="also time the official Efficient-VDVAE step from this checkout (official_step.py)")
    args = p.parse_args()
    if args.design:
        return child(args)
    if args.reference:
        import official_step  # beside this file

        try:
            official_step.config_path(args.reference, args.preset)
        except ValueError as e:
            p.error(str(e))
    rates = machine_report()
    official = official_step.check(args.reference, args.preset, args.batch) if args.reference else None
    from vdvae_dist.core.precision import capabilities

    import torch

    native = capabilities(torch.device("cuda" if torch.cuda.is_available() else "cpu")).native_bf16
    dtypes = ("fp32", "bf16") if args.dtypes == "auto" and native else (
        ("fp32",) if args.dtypes == "auto" else tuple(args.dtypes.split(",")))
    rows = {}
    best = dtypes[-1]  # bf16 where it runs, else fp32
    variants = VARIANTS + ([("efficient", best, "none", args.compile)] if args.compile != "off" else [])
    for design, dtype, ckpt, compile_mode in variants:
        if dtype not in dtypes:
            continue
        cmd = [sys.executable, __file__, "--preset", args.preset, "--batch", str(args.batch), "--steps",
               str(args.steps), "--warmup", str(args.warmup), "--design", design, "--dtype", dtype,
               "--ckpt", ckpt, "--compile", compile_mode]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        extra = ckpt if ckpt != "none" else ("compile" if compile_mode != "off" else "")
        key = (design, dtype, extra) if extra else (design, dtype)
        rows[key] = r = json.loads(out.strip().splitlines()[-1])
        label = "+".join(key[1:])
        if compile_mode != "off":
            print(f"compile={compile_mode}: first step {r['first_step_s']:.1f} s (compiling included)"
                  + (f"; FAILED, ran eager: {r['compile_failure']}" if r["compile_failure"] else ""))
        print(f"{design:9s} {label:14s}: {r['images_per_s']:6.2f} img/s  {r['step_s']:6.2f} s/step  "
              f"peak RSS {r['peak_rss_gb']:5.2f} GB  {r['gflop_per_step']:8.0f} GFLOP/step  "
              f"{r['gflops']:6.1f} GFLOP/s = {100 * r['gflops'] / rates[dtype]:3.0f}% of the {dtype} matmul rate  "
              f"{r['params']:,} params", flush=True)
    if official:
        official_step.report(args, official, rows, rates)
    for dtype in dtypes:
        e, o = rows["efficient", dtype], rows["original", dtype]
        print(f"efficient/original {dtype}: speed x{e['images_per_s'] / o['images_per_s']:.2f}, "
              f"peak RSS x{e['peak_rss_gb'] / o['peak_rss_gb']:.2f}")
    base = rows["efficient", "fp32"]
    for key, r in rows.items():
        if key[0] == "efficient" and key != ("efficient", "fp32"):
            print(f"efficient {'+'.join(key[1:])} / fp32: speed x{r['images_per_s'] / base['images_per_s']:.2f}, "
                  f"peak RSS x{r['peak_rss_gb'] / base['peak_rss_gb']:.2f}")


if __name__ == "__main__":
    main()
