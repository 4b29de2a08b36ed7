"""DeepSpeed ZeRO stages side by side: images/s and peak memory per worker with 1 and 2
CPU workers at the same global batch, in one run; then DeepSpeed's own estimate of the
model-state memory per GPU for the paper's ffhq256 and imagenet64 presets.

Workers are plain processes on gloo (the same engine code Ray Train runs), so the numbers
are the engine's, not Ray's start-up.

    python benchmarks/scaling.py                       # tiny preset, global batch 8, 20 steps
    python benchmarks/scaling.py --preset mnist-small --batch 32
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time

from ports import free_port


def worker(rank: int, world: int, args, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), DS_ACCELERATOR="cpu")
    import torch
    import torch.distributed as dist

    torch.set_num_threads(max(1, 2 // world))  # the machine's 2 cores shared by the workers
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from vdvae_dist.config import load
    from vdvae_dist.engine.deepspeed_rule import DeepSpeedRule
    from vdvae_dist.train.step import train_step
    from vdvae_dist.model import build_model
    from vdvae_dist.train.objective import group_sizes

    cfg = load(args.preset, overrides=[f"engine.zero_stage={args.stage}", f"optim.batch_size={args.batch}",
                                       f"scaling.workers={world}", "optim.skip_threshold=0"])
    torch.manual_seed(0)
    model = build_model(cfg.model)
    rule = DeepSpeedRule(model, cfg, world)
    sizes = group_sizes(model)
    x = torch.randint(0, 256, (args.batch // world, *model.data_shape), dtype=torch.uint8)
    for _ in range(3):
        train_step(rule, x, cfg.loss, sizes, 0, rank)
    dist.barrier()
    t = time.perf_counter()
    for _ in range(args.steps):
        train_step(rule, x, cfg.loss, sizes, 0, rank)
    dist.barrier()
    elapsed = time.perf_counter() - t
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # MiB
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"images_per_s": args.batch * args.steps / elapsed, "peak_rss_mib": rss}, f)
    dist.destroy_process_group()


def estimates() -> None:
    import torch

    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs_all_cold
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs_all_cold

    from vdvae_dist.config import load
    from vdvae_dist.model import build_model

    for preset, gpus in (("ffhq256", 8), ("imagenet64", 4)):
        with torch.device("meta"):
            model = build_model(load(preset).model)
        total = sum(p.numel() for p in model.parameters())
        largest = max(p.numel() for p in model.parameters())
        print(f"\nDeepSpeed model-state memory estimate, {preset} ({total:,} params) on 1 node x {gpus} GPUs:")
        estimate_zero2_model_states_mem_needs_all_cold(total, num_gpus_per_node=gpus)
        estimate_zero3_model_states_mem_needs_all_cold(total, largest, num_gpus_per_node=gpus)


def main() -> None:
    import torch.multiprocessing as mp

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--batch", type=int, default=8, help="global batch")
    p.add_argument("--steps", type=int, default=20)
    args = p.parse_args()
    print(f"{args.preset}, global batch {args.batch}, {args.steps} timed steps, bf16, CPU (gloo)")
    print(f"{'stage':>5} {'workers':>7} {'img/s':>8} {'peak RSS/worker MiB':>20}")
    rows = {}
    for stage in (0, 1, 2, 3):
        for world in (1, 2):
            args.stage = stage
            with tempfile.TemporaryDirectory() as out:
                mp.spawn(worker, args=(world, args, free_port(), out), nprocs=world)
                ranks = [json.load(open(os.path.join(out, f"rank{r}.json"))) for r in range(world)]
            rate = min(r["images_per_s"] for r in ranks)
            rss = max(r["peak_rss_mib"] for r in ranks)
            rows[stage, world] = (rate, rss)
            print(f"{stage:>5} {world:>7} {rate:>8.1f} {rss:>20.0f}", flush=True)
    for stage in (0, 1, 2, 3):
        (r1, m1), (r2, m2) = rows[stage, 1], rows[stage, 2]
        print(f"stage {stage}: 2 workers / 1 worker: speed x{r2 / r1:.2f}, peak RSS per worker x{m2 / m1:.2f}")
    estimates()


if __name__ == "__main__":
    main()
