"""Sampling service under a hostile mix: 64 concurrent clients for a fixed time, each
request drawn at random from valid ones (/sample, /reconstruct) and malformed ones (bad
JSON, out-of-range and boolean numbers, a 5,000-digit number, an unbounded temperature, a
chunked body past the limit, a declared oversize body, a thin 1x20000 PNG, an EPS file,
random bytes as an image). Reports the count of responses by status, p50/p99 latency,
and the model replica's peak memory. Passes when no request got a 5xx.

    python benchmarks/serve_soak.py                    # 64 clients, 30 s, tiny preset
    python benchmarks/serve_soak.py --seconds 60 --clients 32
"""
from __future__ import annotations

import argparse
import collections
import io
import os
import platform
import random
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import requests
from PIL import Image

from ports import free_port
from serve_load import write_weights


def png(width: int, height: int, mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (width, height)).save(buf, format="PNG")
    return buf.getvalue()


def oversize_chunks(total: int):
    """A body sent with Transfer-Encoding: chunked (no Content-Length)."""
    piece = b'{"n": 1, "pad": "' + b"x" * 65536
    sent = 0
    while sent < total:
        yield piece
        sent += len(piece)


def request_kinds(url: str, max_body: int) -> dict:
    good_png = png(48, 40)
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"
    sample, recon = url + "/sample", url + "/reconstruct"
    return {
        "valid sample": lambda s: s.post(sample, json={"n": 1, "seed": random.randrange(10**6), "format": "npy"}),
        "valid reconstruct": lambda s: s.post(recon, files={"image": ("x.png", good_png, "image/png")},
                                              data={"depth": "1", "seed": "3"}),
        "bad json": lambda s: s.post(sample, data=b"{not json", headers={"Content-Type": "application/json"}),
        "n out of range": lambda s: s.post(sample, json={"n": -3}),
        "n as boolean": lambda s: s.post(sample, json={"n": True}),
        "temperature 1e308": lambda s: s.post(sample, json={"n": 1, "temperature": 1e308}),
        "5000-digit depth": lambda s: s.post(recon, files={"image": ("x.png", good_png, "image/png")},
                                             data={"depth": "9" * 5000}),
        "chunked oversize": lambda s: s.post(sample, data=oversize_chunks(2 * max_body),
                                             headers={"Content-Type": "application/json"}),
        "declared oversize": lambda s: s.post(sample, data=b"{}", headers={"Content-Type": "application/json",
                                                                           "Content-Length": str(10 * max_body)}),
        "thin png": lambda s: s.post(recon, files={"image": ("thin.png", png(20000, 1), "image/png")}),
        "eps image": lambda s: s.post(recon, files={"image": ("x.eps", eps, "application/postscript")}),
        "random bytes image": lambda s: s.post(recon, files={"image": ("x.png", os.urandom(2048), "image/png")}),
    }


def peak_rss_gb(pid: int) -> float:
    """The process's peak resident set (VmHWM), Linux."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--seconds", type=float, default=30.0)
    args = p.parse_args()

    import ray
    from ray import serve
    from ray.util.state import list_actors

    from vdvae_dist.config import load
    from vdvae_dist.serve.app import run

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs", flush=True)
    ray.init(address="local", include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    port = free_port()
    cfg = load(args.preset, overrides=["serve.host=127.0.0.1", f"serve.port={port}", "serve.max_body_mb=1"])
    max_body = int(cfg.serve.max_body_mb * 2**20)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            url = run(write_weights(args.preset, Path(tmp)), cfg, blocking=False)
            deadline = time.time() + 120
            while time.time() < deadline:
                try:
                    if requests.get(url + "/healthz", timeout=5).status_code == 200:
                        break
                except requests.ConnectionError:
                    pass
                time.sleep(0.5)
            kinds = request_kinds(url, max_body)
            names = sorted(kinds)
            counts: dict = collections.defaultdict(collections.Counter)
            latencies: list[float] = []
            lock = threading.Lock()
            stop = time.perf_counter() + args.seconds

            def client(i: int) -> None:
                rng = random.Random(i)
                session = requests.Session()
                while time.perf_counter() < stop:
                    name = rng.choice(names)
                    t = time.perf_counter()
                    try:
                        status = kinds[name](session).status_code
                    except requests.RequestException as e:  # e.g. the server closing an oversize upload
                        status = f"closed ({type(e).__name__})"
                        session = requests.Session()
                    with lock:
                        counts[name][status] += 1
                        latencies.append(time.perf_counter() - t)

            threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            model_pids = [a.pid for a in list_actors(filters=[("state", "=", "ALIVE")])
                          if "VDVAEModel" in (a.class_name or "") or "VDVAEModel" in (a.name or "")]
            peaks = [peak_rss_gb(pid) for pid in model_pids]
        finally:
            serve.shutdown()
            ray.shutdown()
    total = collections.Counter()
    print(f"{args.clients} clients for {args.seconds:.0f} s, {args.preset} preset")
    print("| request | responses by status |\n|---|---|")
    for name in names:
        total.update(counts[name])
        print(f"| {name} | " + ", ".join(f"{k}: {v}" for k, v in sorted(counts[name].items(), key=str)) + " |")
    lat = np.array(latencies) * 1000
    fivexx = sum(v for k, v in total.items() if isinstance(k, int) and k >= 500)
    print(f"all: {sum(total.values())} requests; " + ", ".join(f"{k}: {v}" for k, v in sorted(total.items(), key=str)))
    print(f"latency p50 {np.percentile(lat, 50):.0f} ms, p99 {np.percentile(lat, 99):.0f} ms; "
          f"model replica peak RSS {max(peaks, default=float('nan')):.2f} GB")
    print("RESULT:", "PASS (no 5xx)" if fivexx == 0 else f"FAIL ({fivexx} responses with 5xx)")


if __name__ == "__main__":
    main()
