"""Decoded images/s of the shard stream next to what one training step consumes.

Builds PNG and JPEG shard sets at 32, 64 and 256 px from scikit-image's colour photos,
once on file:// and once on a loopback S3 server (moto, in this process), streams each
with 1 and 2 DataLoader workers, and measures the training step's images/s at the `tiny`
and `cifar10` presets on the same machine, all in one run.

    python benchmarks/data_stream.py
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch

from ports import free_port

IMAGES = {32: 2000, 64: 1000, 256: 300}


def stream_rate(url: str, workers: int, batch: int, seconds: float) -> float:
    """Images/s over at least `seconds` of steady streaming (worker start-up excluded)."""
    from vdvae_dist.data.stream import train_loader

    loader = train_loader(url, batch, seed=0, num_workers=workers, shuffle_buffer=100)
    for _ in range(max(1, workers) * 2):  # every worker has started and filled its buffer
        next(loader)
    t, n = time.perf_counter(), 0
    while time.perf_counter() - t < seconds:
        n += len(next(loader))
    rate = n / (time.perf_counter() - t)
    loader.close()
    return rate


def step_rate(preset: str, batch: int, steps: int) -> float:
    from vdvae_dist.config import load
    from vdvae_dist.model import build_model
    from vdvae_dist.train.objective import group_sizes
    from vdvae_dist.train.step import train_step
    from vdvae_dist.train.torch_rule import TorchRule

    cfg = load(preset, overrides=[f"optim.batch_size={batch}", "optim.skip_threshold=0", "engine.precision=bf16"])
    rule = TorchRule(build_model(cfg.model), cfg, torch.device("cpu"))
    sizes = group_sizes(rule.module)
    x = torch.randint(0, 256, (batch, *rule.module.data_shape), dtype=torch.uint8)
    train_step(rule, x, cfg.loss, sizes, seed=0)  # warm-up
    t = time.perf_counter()
    for _ in range(steps):
        train_step(rule, x, cfg.loss, sizes, seed=0)
    return batch * steps / (time.perf_counter() - t)


def start_s3() -> str:
    import boto3
    from moto.server import ThreadedMotoServer

    port = free_port()
    ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False).start()
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update({"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                       "AWS_DEFAULT_REGION": "us-east-1"})
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="bench")
    return endpoint


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seconds", type=float, default=4.0, help="timed streaming per measurement")
    args = p.parse_args()
    import logging

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    from vdvae_dist.data.shardwriter import build

    start_s3()
    tmp = tempfile.mkdtemp(prefix="stream-bench-")
    print(f"{'px':>4} {'fmt':>4} {'store':>5} {'workers':>7} {'img/s':>9}", flush=True)
    rates = {}
    for res, n in IMAGES.items():
        for fmt in ("png", "jpg"):
            for store in ("file", "s3"):
                url = f"{tmp}/{res}-{fmt}" if store == "file" else f"s3://bench/{res}-{fmt}"
                build(f"skimage:{n // 9}", url, res, val=1, image_format=fmt, shard_bytes=4 * 2**20, workers=2,
                      progress=False)
                for workers in (1, 2):
                    r = rates[res, fmt, store, workers] = stream_rate(url, workers, args.batch, args.seconds)
                    print(f"{res:>4} {fmt:>4} {store:>5} {workers:>7} {r:>9.0f}", flush=True)
    tiny = step_rate("tiny", 8, 10)
    cifar = step_rate("cifar10", 8, 1)
    print(f"training step consumes: tiny {tiny:.1f} img/s, cifar10 {cifar:.2f} img/s (batch 8, bf16)")
    worst32 = min(v for k, v in rates.items() if k[0] == 32)
    print(f"slowest 32 px stream / tiny step: x{worst32 / tiny:.1f}; / cifar10 step: x{worst32 / cifar:.0f}")
    for res in IMAGES:
        best = max(v for k, v in rates.items() if k[0] == res)
        print(f"{res} px: best stream {best:.0f} img/s")


if __name__ == "__main__":
    main()
