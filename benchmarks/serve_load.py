"""Sampling service under load, next to its floor: requests/s and p50/p99 latency at 1, 8
and 32 concurrent clients for three servers of the same weights, measured in one run:

  floor      the model behind a plain FastAPI app in one uvicorn process (no Ray, no
             batching): the least any HTTP service of this model can cost
  serve on   our Serve app with dynamic batching (serve.max_batch_size=32)
  serve off  our Serve app without it (serve.max_batch_size=1)

The three are measured in turns at each concurrency (floor, on, off), so machine noise hits
all alike. Each request asks for one sample as .npy (the same JSON body and response for
all three). The weights are an untrained export of the preset: throughput does not depend
on what the weights learned. The floor and the Serve replicas run the model with the same
number of torch threads (--cpus). First, the model alone: milliseconds per sampled image
at batch 1, 8 and 32, the most batching can save in the forward pass. Last, the two ratios
to the floor the service is held to: p50 at 1 client (target <= 1.5) and req/s at 32
clients (target >= 2). With --trivial, two more Serve endpoints answer a constant without
any model, one ignoring the request body and one reading it: Serve's own cost per request.

    python benchmarks/serve_load.py                      # tiny preset, 2 rounds of 8 s per cell
    python benchmarks/serve_load.py --preset cifar10 --seconds 20
    python benchmarks/serve_load.py --trivial            # also: Serve's own cost per request
"""
# no `from __future__ import annotations`: FastAPI resolves the floor's route signature at runtime

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import requests

from ports import free_port

CLIENTS = (1, 8, 32)
TARGET_P50_RATIO, TARGET_RPS_RATIO = 1.5, 2.0


def write_weights(preset: str, folder: Path) -> str:
    import torch

    from vdvae_dist.config import load, to_dict
    from vdvae_dist.model import build_model
    from vdvae_dist.artifacts.run_folder import EXPORT_NAME
    from vdvae_dist.artifacts.weights import export_dict

    cfg = load(preset)
    torch.manual_seed(0)
    path = folder / EXPORT_NAME
    torch.save(export_dict(to_dict(cfg), build_model(cfg.model).state_dict(), 0), path)
    return str(path)


def machine(threads: int) -> str:
    import ray
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (f"machine: {cpu}, {cores} cores, torch {torch.__version__} ({torch.backends.cpu.get_cpu_capability()}), "
            f"{threads} torch thread(s) in the floor and in each model replica, ray {ray.__version__}")


def forward_cost(preset: str, batches: tuple[int, ...], threads: int) -> None:
    import torch

    from vdvae_dist.config import load
    from vdvae_dist.model import build_model

    torch.set_num_threads(threads)
    model = build_model(load(preset).model).eval()
    cells = []
    for n in batches:
        jobs = [(1, 1.0, i) for i in range(n)]
        model.sample_batch(jobs)  # warm-up
        t = time.perf_counter()
        model.sample_batch(jobs)
        cells.append(f"batch {n}: {(time.perf_counter() - t) * 1000 / n:.1f} ms/image")
    print(f"model alone, {preset}, {threads} thread(s): " + ", ".join(cells), flush=True)


# --- the floor: a plain FastAPI app in one uvicorn process ----------------------------------

def serve_floor(weights: str, port: int, threads: int) -> None:
    """Runs in its own process (`--floor-server`): the same weights, the same request model
    and .npy encoding as the service, the forward pass called directly in the handler."""
    import torch
    import uvicorn
    from fastapi import FastAPI
    from fastapi.responses import Response

    from vdvae_dist.artifacts.weights import load_weights
    from vdvae_dist.serve.requests import SampleRequest, npy_bytes
    from vdvae_dist.serve.sampler import Sampler

    torch.set_num_threads(threads)
    sampler = Sampler(load_weights(weights), torch.device("cpu"), max_images=32)
    app = FastAPI()

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.post("/sample")
    async def sample(body: SampleRequest) -> Response:
        # one request at a time on the loop: nothing to share a forward pass with
        (images,) = sampler.sample_many([{"n": body.n, "temperature": body.temperature, "seed": body.seed}])
        return Response(npy_bytes(images), media_type="application/x-npy")

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


def start_floor(weights: str, threads: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    proc = subprocess.Popen([sys.executable, __file__, "--floor-server", weights, "--port", str(port),
                             "--cpus", str(threads)], env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the floor server exited"
        try:
            if requests.get(url + "/healthz", timeout=2).status_code == 200:
                return proc, url
        except requests.ConnectionError:
            time.sleep(0.2)
    proc.kill()
    raise TimeoutError("the floor server did not start within 120 s")


# --- load --------------------------------------------------------------------------------------

def load_run(url: str, clients: int, seconds: float) -> dict:
    """Every client posts back to back for `seconds`; returns the latencies (s) of the answered
    requests, the count of failed ones and the elapsed time."""
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
    return {"latencies": latencies, "errors": len(errors), "elapsed": time.perf_counter() - t0}


def summary(runs: list[dict]) -> dict:
    """Several rounds of one cell as one: requests over the summed time, pooled percentiles."""
    lat = np.array([x for r in runs for x in r["latencies"]] or [np.nan]) * 1000  # all failed: no latency
    return {"rps": sum(len(r["latencies"]) for r in runs) / sum(r["elapsed"] for r in runs),
            "p50": float(np.percentile(lat, 50)), "p99": float(np.percentile(lat, 99)),
            "errors": sum(r["errors"] for r in runs)}


def batching(url: str) -> dict | None:
    """The service's forward-pass counters (GET /info), None for servers without them."""
    try:
        return requests.get(url + "/info", timeout=30).json()["batching"]
    except (requests.RequestException, ValueError, KeyError):
        return None


def trivial_app(read_body: bool):
    """Serve's own cost: a FastAPI ingress on Serve answering a constant, no model. Reading
    the body costs a second round trip: the replica fetches it from Serve's HTTP proxy."""
    from fastapi import FastAPI, Request
    from fastapi.responses import Response
    from ray import serve

    api = FastAPI()

    @serve.deployment(name="Constant", ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=1000)
    @serve.ingress(api)
    class Constant:
        @api.post("/sample")
        async def sample(self, request: Request) -> Response:
            if read_body:
                await request.body()
            return Response(b"\x93NUMPY", media_type="application/x-npy")

    return Constant.bind()


def deploy(args, weights: str, port: int) -> dict[str, str]:
    """Our app with batching on and off (and the constant endpoints) on the running Serve."""
    from ray import serve

    from vdvae_dist.config import load
    from vdvae_dist.serve.app import build

    urls = {}
    for mode, batch in (("on", 32), ("off", 1)):
        cfg = load(args.preset, overrides=[f"serve.max_batch_size={batch}", f"serve.batch_wait_s={args.batch_wait}",
                                           f"serve.cpus_per_replica={args.cpus}", "serve.max_n=32"])
        serve.run(build(weights, cfg), name=f"batching-{mode}", route_prefix=f"/{mode}", blocking=False)
        urls[f"serve {mode}"] = f"http://127.0.0.1:{port}/{mode}"
    if args.trivial:
        for name, read_body in (("constant", False), ("constant, body read", True)):
            prefix = "/" + name.replace(", ", "-").replace(" ", "-")
            serve.run(trivial_app(read_body), name=prefix[1:], route_prefix=prefix, blocking=False)
            urls[f"serve {name}"] = f"http://127.0.0.1:{port}{prefix}"
    return urls


def measure(urls: dict[str, str], clients: tuple[int, ...], args) -> dict:
    """Every (clients, server) cell once per round, in turns; rounds pooled per cell."""
    runs: dict = {}
    forward: dict = {}  # (clients, server) -> [requests, forward passes]
    for _ in range(args.rounds):
        for n in clients:
            for name, url in urls.items():
                before = batching(url)
                runs.setdefault((n, name), []).append(load_run(url, n, args.seconds))
                after = batching(url)
                if before and after:
                    f = forward.setdefault((n, name), [0, 0])
                    f[0] += after["forward_requests"] - before["forward_requests"]
                    f[1] += after["batches"] - before["batches"]
    print("| clients | server | req/s | p50 ms | p99 ms | requests per forward pass | errors |\n"
          "|---|---|---|---|---|---|---|")
    results = {}
    for n in clients:
        for name in urls:
            r = results[n, name] = summary(runs[n, name])
            reqs, passes = forward.get((n, name), (0, 0))
            per_pass = f"{reqs / passes:.1f}" if passes else "-"
            print(f"| {n} | {name} | {r['rps']:.1f} | {r['p50']:.1f} | {r['p99']:.1f} | {per_pass} | {r['errors']} |")
    return results


def ratios(results: dict, clients: tuple[int, ...]) -> None:
    low, high = min(clients), max(clients)
    floor_low, floor_high = results[low, "floor"], results[high, "floor"]
    for mode in ("on", "off"):
        ours_low, ours_high = results[low, f"serve {mode}"], results[high, f"serve {mode}"]
        p50 = ours_low["p50"] / floor_low["p50"]
        rps = ours_high["rps"] / floor_high["rps"]
        print(f"batching {mode}: p50 at {low} client(s) / floor x{p50:.2f} (target <= {TARGET_P50_RATIO:g}: "
              f"{'met' if p50 <= TARGET_P50_RATIO else 'missed'}); req/s at {high} clients / floor x{rps:.2f} "
              f"(target >= {TARGET_RPS_RATIO:g}: {'met' if rps >= TARGET_RPS_RATIO else 'missed'})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--seconds", type=float, default=8.0, help="per measurement")
    p.add_argument("--rounds", type=int, default=2, help="turns over all cells (pooled per cell)")
    p.add_argument("--cpus", type=int, default=1, help="serve.cpus_per_replica = torch threads of the floor too")
    p.add_argument("--batch-wait", type=float, default=0.002, help="serve.batch_wait_s of both Serve apps")
    p.add_argument("--clients", default=",".join(map(str, CLIENTS)), help="concurrencies, comma-separated")
    p.add_argument("--trivial", action="store_true", help="also Serve endpoints returning a constant")
    p.add_argument("--skip-forward", action="store_true", help="only the HTTP measurements")
    p.add_argument("--floor-server", metavar="WEIGHTS", help=argparse.SUPPRESS)  # the floor's own process
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.floor_server:
        return serve_floor(args.floor_server, args.port, args.cpus)
    clients = tuple(int(c) for c in args.clients.split(","))

    import ray
    from ray import serve

    print(machine(args.cpus), flush=True)
    if not args.skip_forward:
        forward_cost(args.preset, (1, 8, 32), args.cpus)
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": str(args.cpus)}})
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    floor = None
    with tempfile.TemporaryDirectory() as tmp:
        try:
            weights = write_weights(args.preset, Path(tmp))
            floor, floor_url = start_floor(weights, args.cpus)
            urls = {"floor": floor_url, **deploy(args, weights, port)}
            for url in urls.values():  # warm-up: first forward passes, connection set-up
                load_run(url, 4, 2.0)
            print(f"{args.preset}, one sample per request (.npy), {args.rounds} x {args.seconds:g} s per cell, "
                  f"serve.batch_wait_s={args.batch_wait:g}, client threads in this process", flush=True)
            results = measure(urls, clients, args)
        finally:
            serve.shutdown()
            ray.shutdown()
            if floor is not None:
                floor.terminate()
                floor.wait(timeout=30)
    ratios(results, clients)


if __name__ == "__main__":
    main()
