"""Sampling service under a hostile mix (the Serve half of `chaos.py`): 64 concurrent
clients for a fixed time, each request drawn at random from valid ones (/sample,
/reconstruct, with the bearer token) and malformed or hostile ones: no or a wrong token,
bad JSON, out-of-range and boolean numbers, a 5,000-digit number, an unbounded temperature,
a chunked JSON body and a chunked multipart upload past the body limit, a declared
oversize body, thin PNGs (1x20000 and 20,000,000x1), GIF and EPS files, random bytes as an
image. Reports the count of responses by status, p50/p99 latency, and the service
replica's peak memory (routes and model share it). Passes when no request got a 5xx.

With --overload (issue 23 N1-N3) the mix adds legitimate but heavy load and cheap bombs:
/sample with n = serve.max_n (a third of all requests), a lossless WebP of one colour that
decodes to 40 megapixels, and JSON bodies of 5,000 values, with serve.request_timeout_s=2
and serve.health_check_period_s=1. It passes when the only 5xx are the intended 503 (busy,
Retry-After) and 504 (timeout), /healthz never fails and the replica is never replaced.

    python benchmarks/chaos.py serve                   # 64 clients, 30 s, tiny preset
    python benchmarks/chaos.py serve --seconds 60 --clients 32
    python benchmarks/chaos.py serve --overload --seconds 60
"""
from __future__ import annotations

import argparse
import collections
import io
import os
import platform
import random
import secrets
import socket
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import requests
from PIL import Image

from ports import free_port
from serve_load import write_weights


TOKEN_ENV = "VDVAE_SOAK_TOKEN"


def encoded(width: int, height: int, mode: str = "RGB", format: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (width, height)).save(buf, format=format)
    return buf.getvalue()


def oversize_chunks(total: int):
    """A body sent with Transfer-Encoding: chunked (no Content-Length)."""
    piece = b'{"n": 1, "pad": "' + b"x" * 65536
    sent = 0
    while sent < total:
        yield piece
        sent += len(piece)


def chunked_multipart(total: int):
    """A multipart upload without Content-Length whose file part grows past `total` bytes."""
    yield b'--soak\r\nContent-Disposition: form-data; name="image"; filename="big.png"\r\n' \
          b"Content-Type: image/png\r\n\r\n"
    for _ in range(0, total, 65536):
        yield b"\0" * 65536
    yield b"\r\n--soak--\r\n"


class RawResponse:
    def __init__(self, status_code: int):
        self.status_code = status_code


def declared_oversize(url: str, length: int, token: str) -> RawResponse:
    """Headers announcing a `length`-byte body, then only 2 bytes (requests would correct the
    Content-Length, so the request is written by hand); the answer must come at once."""
    host, port = url.split("//", 1)[1].split(":")
    with socket.create_connection((host, int(port)), timeout=30) as conn:
        conn.sendall(f"POST /sample HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\n"
                     f"Content-Type: application/json\r\nContent-Length: {length}\r\n\r\n{{}}".encode())
        status_line = conn.makefile("rb").readline().decode()
    return RawResponse(int(status_line.split()[1]))


def request_kinds(url: str, max_body: int, token: str) -> dict:
    """name -> a call taking a requests.Session (which carries the token) and returning a response."""
    good_png = encoded(48, 40)
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"
    sample, recon = url + "/sample", url + "/reconstruct"
    return {
        "no token": lambda s: requests.post(sample, json={"n": 1}),
        "wrong token": lambda s: requests.post(sample, json={"n": 1}, headers={"Authorization": "Bearer " + token[::-1]}),
        "gif image": lambda s: s.post(recon, files={"image": ("x.gif", encoded(8, 8, "P", "GIF"), "image/gif")},
                                      data={"depth": "1"}),
        "20000000x1 png": lambda s: s.post(recon, files={"image": ("wide.png", WIDE_PNG, "image/png")},
                                           data={"depth": "1"}),
        "chunked multipart oversize": lambda s: s.post(
            recon, data=chunked_multipart(2 * max_body), headers={"Content-Type": "multipart/form-data; boundary=soak"}),
        "base64 json oversize": lambda s: s.post(recon, json={"image_base64": "A" * (2 * max_body), "depth": 1}),
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
        "declared oversize": lambda s: declared_oversize(url, 10 * max_body, token),
        "1x20000 png": lambda s: s.post(recon, files={"image": ("thin.png", encoded(1, 20000), "image/png")},
                                        data={"depth": "1"}),
        "eps image": lambda s: s.post(recon, files={"image": ("x.eps", eps, "application/postscript")},
                                      data={"depth": "1"}),
        "random bytes image": lambda s: s.post(recon, files={"image": ("x.png", os.urandom(2048), "image/png")},
                                               data={"depth": "1"}),
    }


WIDE_PNG = encoded(20_000_000, 1, "L")  # ~20 KB on the wire, 20M pixels decoded


def overload_kinds(url: str, max_n: int) -> dict:
    """Issue 23 N1-N3: heavy legitimate requests and cheap bombs."""
    buf = io.BytesIO()
    Image.new("RGB", (6324, 6324)).save(buf, format="WEBP", lossless=True)
    bomb = buf.getvalue()  # a few hundred bytes; 40 megapixels decoded
    many = '{"n": 1, "temperature": [' + "1," * 5000 + "1]}"
    sample, recon = url + "/sample", url + "/reconstruct"
    return {
        "big-n sample": lambda s: s.post(sample, json={"n": max_n, "seed": random.randrange(10**6), "format": "npy"}),
        "40 MP webp bomb": lambda s: s.post(recon, files={"image": ("x.webp", bomb, "image/webp")},
                                            data={"depth": "1"}),
        "json of 5,000 values": lambda s: s.post(sample, data=many, headers={"Content-Type": "application/json"}),
    }


def peak_of(title: str) -> float:
    """Peak RSS of the Ray worker process whose title (Ray sets it to ray::<actor>...)
    starts with `title`, GB; the largest if several."""
    peaks = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and (proc / "cmdline").read_bytes().startswith(f"ray::{title}".encode()):
                peaks.append(peak_rss_gb(int(proc.name)))
        except OSError:  # the process ended while we looked
            continue
    return max(peaks, default=float("nan"))


def peak_rss_gb(pid: int) -> float:
    """The process's peak resident set (VmHWM), Linux."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def authorized(token: str) -> requests.Session:
    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {token}"
    return session


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="chaos.py serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--overload", action="store_true", help="add issue 23's N1-N3 load (see above)")
    args = p.parse_args(argv)

    import ray
    from ray import serve

    from vdvae_dist.config import load
    from vdvae_dist.serve.process import run

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs", flush=True)
    token = secrets.token_urlsafe(24)
    ray.init(address="local", include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", TOKEN_ENV: token}})
    port = free_port()
    overload = ["serve.request_timeout_s=2", "serve.health_check_period_s=1"] if args.overload else []
    cfg = load(args.preset, overrides=["serve.host=127.0.0.1", f"serve.port={port}", "serve.max_body_mb=1",
                                       f"serve.auth_token_env={TOKEN_ENV}", *overload])
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
            kinds = request_kinds(url, max_body, token)
            names = sorted(kinds)
            if args.overload:
                kinds.update(overload_kinds(url, cfg.serve.max_n))
                names = sorted(kinds) + ["big-n sample"] * (len(kinds) // 2)  # a third of all requests
            replica = authorized(token).get(url + "/info", timeout=30).json()["replica"]
            health = collections.Counter()
            counts: dict = collections.defaultdict(collections.Counter)
            latencies: list[float] = []
            lock = threading.Lock()
            stop = time.perf_counter() + args.seconds

            def client(i: int) -> None:
                rng = random.Random(i)
                session = authorized(token)
                while time.perf_counter() < stop:
                    name = rng.choice(names)
                    t = time.perf_counter()
                    try:
                        status = kinds[name](session).status_code
                    except requests.RequestException as e:  # e.g. the server closing an oversize upload
                        status = f"closed ({type(e).__name__})"
                        session = authorized(token)
                    with lock:
                        counts[name][status] += 1
                        latencies.append(time.perf_counter() - t)

            def watch_health() -> None:  # what Serve's health check sees, from outside
                while time.perf_counter() < stop:
                    try:
                        health[requests.get(url + "/healthz", timeout=10).status_code] += 1
                    except requests.RequestException as e:
                        health[type(e).__name__] += 1
                    time.sleep(0.5)

            threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
            threads.append(threading.Thread(target=watch_health))
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            replica_peak = peak_of("ServeReplica:vdvae:VDVAE")
            same_replica = authorized(token).get(url + "/info", timeout=60).json()["replica"] == replica
        finally:
            serve.shutdown()
            ray.shutdown()
    total = collections.Counter()
    print(f"{args.clients} clients for {args.seconds:.0f} s, {args.preset} preset")
    print("| request | responses by status |\n|---|---|")
    for name in sorted(set(names)):
        total.update(counts[name])
        print(f"| {name} | " + ", ".join(f"{k}: {v}" for k, v in sorted(counts[name].items(), key=str)) + " |")
    lat = np.array(latencies) * 1000
    intended = {503, 504} if args.overload else set()  # busy (Retry-After) and timeouts, under overload only
    fivexx = sum(v for k, v in total.items() if isinstance(k, int) and k >= 500 and k not in intended)
    print(f"all: {sum(total.values())} requests; " + ", ".join(f"{k}: {v}" for k, v in sorted(total.items(), key=str)))
    print(f"latency p50 {np.percentile(lat, 50):.0f} ms, p99 {np.percentile(lat, 99):.0f} ms; "
          f"peak RSS of the service replica {replica_peak:.2f} GB")
    print("/healthz during the run: " + ", ".join(f"{k}: {v}" for k, v in sorted(health.items(), key=str))
          + f"; the replica {'stayed the same' if same_replica else 'was REPLACED'}")
    healthy = same_replica and set(health) == {200}
    if fivexx == 0 and healthy:
        print("RESULT: PASS (no 5xx" + (" but 503/504" if args.overload else "") + ", healthy throughout)")
    else:
        print(f"RESULT: FAIL ({fivexx} unintended 5xx; healthy throughout: {healthy})")


if __name__ == "__main__":
    main()
