"""Sampling service under load: requests/s and p50/p99 latency at 1, 8 and 32 concurrent
clients, with dynamic batching on (serve.max_batch_size=32) and off (=1), side by side.

Both applications run in one local Ray cluster on 127.0.0.1 and are measured in turns
(off, on) at each concurrency, so machine noise hits both alike. Each request asks for
one sample as .npy. The weights are an untrained export of the preset: throughput does
not depend on what the weights learned. First, the model alone: milliseconds per sampled
image at batch 1, 8 and 32 on one thread, the most batching can save in the forward pass.

    python benchmarks/serve_load.py                      # tiny preset, 8 s per measurement
    python benchmarks/serve_load.py --preset cifar10 --seconds 20
"""
from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import requests

from ports import free_port


def write_weights(preset: str, folder: Path) -> str:
    import torch

    from vdvae_dist.config import load, to_dict
    from vdvae_dist.model import build_model
    from vdvae_dist.artifacts.weights import EXPORT_NAME, export_dict

    cfg = load(preset)
    torch.manual_seed(0)
    path = folder / EXPORT_NAME
    torch.save(export_dict(to_dict(cfg), build_model(cfg.model).state_dict(), 0), path)
    return str(path)


def forward_cost(preset: str, batches: tuple[int, ...]) -> None:
    import torch

    from vdvae_dist.config import load
    from vdvae_dist.model import build_model

    torch.set_num_threads(1)
    model = build_model(load(preset).model).eval()
    cells = []
    for n in batches:
        jobs = [(1, 1.0, i) for i in range(n)]
        model.sample_batch(jobs)  # warm-up
        t = time.perf_counter()
        model.sample_batch(jobs)
        cells.append(f"batch {n}: {(time.perf_counter() - t) * 1000 / n:.1f} ms/image")
    print(f"model alone, {preset}, 1 thread: " + ", ".join(cells), flush=True)


def load_run(url: str, clients: int, seconds: float) -> dict:
    """Every client posts back to back for `seconds`; returns req/s and latency percentiles."""
    latencies: list[float] = []
    errors = []
    stop = time.perf_counter() + seconds
    lock = threading.Lock()

    def client(i: int) -> None:
        session = requests.Session()
        k = 0
        while time.perf_counter() < stop:
            t = time.perf_counter()
            r = session.post(url + "/sample", json={"n": 1, "seed": i * 100_000 + k, "format": "npy"}, timeout=120)
            dt = time.perf_counter() - t
            k += 1
            with lock:
                (latencies if r.status_code == 200 else errors).append(dt)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    lat = np.array(latencies) * 1000
    return {"rps": len(latencies) / elapsed, "p50": float(np.percentile(lat, 50)),
            "p99": float(np.percentile(lat, 99)), "errors": len(errors)}


def main() -> None:
    import ray
    from ray import serve

    from vdvae_dist.config import load
    from vdvae_dist.serve.app import build

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--seconds", type=float, default=8.0, help="per measurement")
    p.add_argument("--cpus", type=float, default=1.0, help="serve.cpus_per_replica (torch threads)")
    p.add_argument("--skip-forward", action="store_true", help="only the HTTP measurements")
    args = p.parse_args()

    if not args.skip_forward:
        forward_cost("tiny", (1, 8, 32))
        forward_cost("cifar10", (1, 8))
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    with tempfile.TemporaryDirectory() as tmp:
        weights = write_weights(args.preset, Path(tmp))
        urls = {}
        for mode, batch in (("off", 1), ("on", 32)):
            cfg = load(args.preset, overrides=[f"serve.max_batch_size={batch}", "serve.batch_wait_s=0.005",
                                               f"serve.cpus_per_replica={args.cpus}", "serve.max_n=32"])
            serve.run(build(weights, cfg), name=f"batching-{mode}", route_prefix=f"/{mode}", blocking=False)
            urls[mode] = f"http://127.0.0.1:{port}/{mode}"
        for url in urls.values():  # warm-up: first forward passes, connection set-up
            load_run(url, 4, 2.0)
        print(f"{args.preset}, one sample per request, {args.seconds:.0f} s per cell, "
              f"{args.cpus:g} CPU per replica, CPU")
        print(f"{'clients':>7} {'batching':>8} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'errors':>6}")
        results = {}
        for clients in (1, 8, 32):
            for mode in ("off", "on"):
                r = results[clients, mode] = load_run(urls[mode], clients, args.seconds)
                print(f"{clients:>7} {mode:>8} {r['rps']:>8.1f} {r['p50']:>8.1f} {r['p99']:>8.1f} {r['errors']:>6}",
                      flush=True)
        for clients in (1, 8, 32):
            off, on = results[clients, "off"], results[clients, "on"]
            print(f"{clients:>2} clients: batching on / off throughput x{on['rps'] / off['rps']:.2f}, "
                  f"p50 x{on['p50'] / off['p50']:.2f}")
    serve.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
