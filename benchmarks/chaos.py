"""Soaks under faults, in two parts: `training` (the default) and `serve` (serve_soak.py).

Training: a run on a 2-node `ray.cluster_utils.Cluster` (one worker
per node) has a random training worker SIGKILLed at random points, `--kills` times, and
must end at the right step with the same final EMA weights as an uninterrupted run of the
same config, trained side by side in the same script.

Each kill waits until the run has made progress since the last restart (a new step in
metrics.jsonl), then a random 0-2 s more, so kills land anywhere: mid-step, mid-checkpoint,
during evaluation of nothing yet, during DeepSpeed start-up of the restarted group.

    python benchmarks/chaos.py training            # 10 kills, tiny preset, 60 steps
    python benchmarks/chaos.py training --kills 3 --steps 30
    python benchmarks/chaos.py serve               # 64 hostile clients for 30 s (see serve_soak.py)
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path


def config(out: Path, shards: Path, steps: int, kills: int):
    from vdvae_dist.config import load

    return load("tiny", overrides=[
        "scaling.workers=2", "scaling.placement=STRICT_SPREAD", f"scaling.max_failures={kills + 2}",
        "optim.batch_size=8", f"optim.total_steps={steps}", "train.checkpoint_every=5", "train.log_every=1",
        f"train.output={out}", f"data.shards={shards}", "data.source=", "data.loader_workers=0",
        "data.shuffle_buffer=8", "train.grid_samples=4", "engine.precision=fp32",
        f"tracking.uri=sqlite:///{out.parent / (out.name + '-mlflow.db')}"])


def last_step(metrics: Path) -> int:
    if not metrics.exists():
        return 0
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines() if line.strip()]
    return steps[-1] if steps else 0


def kill_randomly(out: Path, kills: int, rng: random.Random, done: threading.Event, log: list) -> None:
    from ray.util.state import list_actors

    metrics = out / "metrics.jsonl"
    seen = -1
    while len(log) < kills and not done.is_set():
        step = last_step(metrics)
        if step == seen:  # no progress since the last kill (or start): the group is restarting
            time.sleep(0.2)
            continue
        time.sleep(rng.uniform(0.0, 2.0))
        workers = [a for a in list_actors(filters=[("state", "=", "ALIVE")]) if "RayTrainWorker" in a.class_name]
        if done.is_set() or len(workers) < 2:
            time.sleep(0.2)
            continue
        victim = rng.choice(workers)
        try:
            os.kill(victim.pid, signal.SIGKILL)
        except ProcessLookupError:  # it died on its own between listing and killing
            continue
        log.append({"after_step": step, "pid": victim.pid, "t": round(time.time(), 1)})
        print(f"kill {len(log)}/{kills}: worker pid {victim.pid} after step {step}", flush=True)
        seen = last_step(metrics)


def main(argv: list[str]) -> None:
    if argv[:1] == ["serve"]:
        import serve_soak

        return serve_soak.main(argv[1:])
    if argv[:1] == ["training"]:
        argv = argv[1:]
    p = argparse.ArgumentParser(prog="chaos.py training", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kills", type=int, default=10)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--seed", type=int, default=0, help="seed of the kill schedule")
    args = p.parse_args(argv)

    import ray
    import torch
    from ray.cluster_utils import Cluster

    from vdvae_dist.data.shardwriter import build
    from vdvae_dist.launch.ray_train import train_distributed

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; torch {torch.__version__}")
    os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = "0.25"
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    cluster.add_node(num_cpus=2)
    ray.init(address=cluster.address, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}})
    try:
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            build("skimage:12", str(tmp / "shards"), 32, val=16, shard_bytes=30_000, progress=False)
            t0 = time.perf_counter()
            calm = train_distributed(config(tmp / "calm", tmp / "shards", args.steps, 0))
            t_calm = time.perf_counter() - t0

            kills: list = []
            done = threading.Event()
            killer = threading.Thread(target=kill_randomly,
                                      args=(tmp / "chaos", args.kills, random.Random(args.seed), done, kills))
            killer.start()
            t0 = time.perf_counter()
            try:
                chaos = train_distributed(config(tmp / "chaos", tmp / "shards", args.steps, args.kills))
            finally:
                done.set()
                killer.join()
            t_chaos = time.perf_counter() - t0

            a = torch.load(tmp / "calm" / "ema_fp32.pt", weights_only=True)["ema"]
            b = torch.load(tmp / "chaos" / "ema_fp32.pt", weights_only=True)["ema"]
            diff = max(float((a[k] - b[k]).abs().max()) for k in a)
            scale = max(float(a[k].abs().max()) for k in a)
            print(f"kills: {len(kills)} of {args.kills} asked; final step {chaos['step']} (want {args.steps}); "
                  f"uninterrupted run {t_calm:.0f} s, run under kills {t_chaos:.0f} s (x{t_chaos / t_calm:.2f})")
            print(f"final EMA weights: max |chaos - uninterrupted| = {diff:.3g} (largest weight {scale:.3g}); "
                  f"test bits/dim {chaos['test_bits_per_dim']:.6f} vs {calm['test_bits_per_dim']:.6f}")
            ok = chaos["step"] == args.steps and len(kills) == args.kills and diff <= 1e-5 * max(1.0, scale)
            print("RESULT:", "PASS" if ok else "FAIL")
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1:])
