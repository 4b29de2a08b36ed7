"""The Ray Serve application: one deployment holding the HTTP routes (FastAPI) and the model.

Each replica checks requests (body limit while the body streams in, optional bearer token,
field ranges), loads the EMA weights once, and batches concurrent `/sample` calls into one
forward pass (`batcher.py`; a failing request fails alone). Forward passes, upload decoding
and large encodings run in threads; every wait for the model is bounded by
serve.request_timeout_s. `check_health` fails while a forward pass overruns that timeout,
so Serve replaces a stuck replica. Routes and model share a process, so a request costs one
hop from Serve's proxy and no DeploymentHandle call (benchmarks/RESULTS.md, issue 13 item 6).
Built by `build(model_uri, cfg)`; `build_app(args)` is the entry for Serve config files
(`serve run cluster/serve.yaml`); `run` starts Serve and serves until SIGINT or SIGTERM.
"""
# no `from __future__ import annotations`: FastAPI resolves the route signatures at runtime
import asyncio
import os
import secrets
import signal
import threading
import time
from dataclasses import asdict

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..config import RunConfig, load
from ..config.schema import ServeConfig
from ..artifacts.images import grid, png_bytes
from .guards import BodyLimitMiddleware, Guard, TokenAuthMiddleware, exception_line, token_from_env
from .requests import (MAX_SEED, Limits, ReconstructRequest, RequestError, SampleRequest, decode_base64, form_value,
                       npy_bytes, redact_uri)
from .batcher import Batcher
from .sampler import FAULTS

APP_NAME = "vdvae"
api = FastAPI(
    title="vdvae-dist sampling service",
    description="Samples and reconstructions from a trained (Efficient-)VDVAE. Errors are JSON "
                "`{error, field, allowed}`: 4xx for a bad request (401 without the bearer token when the "
                "service has one), 500 when the model fails on a request, 504 when it does not answer "
                "within serve.request_timeout_s; /healthz answers 503 while a forward pass is stuck.")
_SCHEMAS = {"/sample": SampleRequest, "/reconstruct": ReconstructRequest}


@api.exception_handler(RequestError)
async def _request_error(request: Request, e: RequestError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
    first = e.errors()[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    name = loc[0] if loc else "body"
    schema = next((m for path, m in _SCHEMAS.items() if request.url.path.endswith(path)), None)  # any route prefix
    fields = schema.model_fields if schema else {}
    if first.get("type") == "extra_forbidden":
        allowed = "the fields " + ", ".join(fields)
        error = "unknown field"
    else:
        allowed = fields[name].description if name in fields else "a JSON object (see /docs)"
        error = first.get("msg", "invalid value")
    return JSONResponse({"error": error, "field": name, "allowed": allowed}, status_code=422)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
    """FastAPI's and Starlette's own errors (unparseable body, bad multipart, unknown route)
    in the same JSON shape."""
    if e.status_code in (404, 405):
        field, allowed = "path", "POST /sample, POST /reconstruct, GET /info, GET /healthz, GET /docs"
    else:
        field, allowed = "body", "a JSON object, or multipart form data for /reconstruct (see /docs)"
    return JSONResponse({"error": str(e.detail), "field": field, "allowed": allowed}, status_code=e.status_code,
                        headers=e.headers)


@api.exception_handler(Exception)
async def _server_error(request: Request, e: Exception) -> JSONResponse:
    """Anything else (a bug): still JSON; Starlette logs the traceback."""
    return JSONResponse({"error": f"internal error ({type(e).__name__})", "field": "request",
                         "allowed": "a retry; report it if it persists"}, status_code=500)


# the last added runs first: the token is checked before any of the body is read
api.add_middleware(BodyLimitMiddleware)
api.add_middleware(TokenAuthMiddleware)


def _validated(build):
    """Pydantic models built by hand report like the ones FastAPI parses (JSON 422)."""
    try:
        return build()
    except ValidationError as e:
        raise RequestValidationError(e.errors()) from e


_RECONSTRUCT_BODY = {"requestBody": {"content": {
    "application/json": {"schema": ReconstructRequest.model_json_schema()},
    "multipart/form-data": {"schema": {"type": "object", "required": ["image", "depth"], "properties": {
        "image": {"type": "string", "format": "binary"}, "depth": {"type": "integer"},
        "temperature": {"type": "string", "description": "a number or a JSON list of numbers"},
        "seed": {"type": "integer"}}}}}},
    "responses": {"200": {"description": "the reconstruction as PNG; headers X-Bits-Per-Dim (of the "
                          "uploaded image under the model), X-Depth, X-Seed",
                          "content": {"image/png": {}}}}}
# Encoding a result this small costs less than handing it to a thread (a 32 px sample as
# .npy or PNG takes microseconds); larger ones (grids, big presets) are encoded off the loop.
INLINE_ENCODE_BYTES = 256 * 1024


@serve.deployment(name="VDVAE")
@serve.ingress(api)
class Service:
    """One replica: the HTTP routes and the model in one process, so a request costs one
    hop from Serve's proxy and no handle call. Forward passes, upload decoding and large
    encodings run in threads; the event loop only parses, checks and batches."""

    DECODE_THREADS = 2  # uploads decoded at once (each may take a second and ~200 MB)

    def __init__(self, model_uri: str, serve_cfg: dict):
        import torch

        from ..tracking.logged_weights import load_weights
        from .sampler import Sampler

        s = ServeConfig(**serve_cfg)
        Guard.body_bytes = int(s.max_body_mb * 2**20)
        Guard.token, Guard.token_env = token_from_env(s.auth_token_env), s.auth_token_env
        torch.set_num_threads(max(1, int(s.cpus_per_replica)))
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.sampler = Sampler(load_weights(model_uri), device, max_images=max(s.max_n, s.max_batch_size))
        self.max_n, self.timeout_s, self.faults = s.max_n, s.request_timeout_s, s.fault_injection
        info = self.sampler.info()  # fixed for the replica's life: computed once, not per request
        self.info_body = {**info, "source": redact_uri(info["source"]), "max_n": s.max_n}
        c, h, _ = info["image_shape"]
        self.limits = Limits(s.max_n, info["latent_groups"], c, h)
        self._lock = threading.Lock()  # one forward pass at a time: batches and reconstructions
        self._busy_since: float | None = None  # monotonic start of the running forward pass
        self.batcher = Batcher(lambda jobs: self._locked(self.sampler.sample_many, jobs), s.max_batch_size,
                               s.batch_wait_s)
        self._decode_slots = asyncio.Semaphore(self.DECODE_THREADS)

    # --- the model ----------------------------------------------------------------------------

    def _stuck(self) -> str | None:
        since = self._busy_since
        if since is not None and time.monotonic() - since > self.timeout_s:
            return (f"a forward pass has run for {time.monotonic() - since:.0f} s, past serve.request_timeout_s="
                    f"{self.timeout_s:g}")
        return None

    def check_health(self) -> None:
        """Called by Serve every serve.health_check_period_s: a failure replaces the replica."""
        stuck = self._stuck()
        if stuck:
            raise RuntimeError(f"model replica stuck: {stuck}")

    def _locked(self, fn, *args):
        # in a thread: it waits for the lock no longer than a request waits for its answer
        if not self._lock.acquire(timeout=self.timeout_s):
            raise TimeoutError(f"the model stayed busy for serve.request_timeout_s={self.timeout_s:g} s")
        try:
            self._busy_since = time.monotonic()
            return fn(*args)
        finally:
            self._busy_since = None
            self._lock.release()

    async def _answer(self, work):
        """The model's answer, or 504 after serve.request_timeout_s (the wait is cancelled)."""
        try:
            return await asyncio.wait_for(work, self.timeout_s)
        except (asyncio.TimeoutError, TimeoutError):  # ours, or the model lock's (one class from 3.11)
            raise RequestError("request", f"the model did not answer within {self.timeout_s:g} s",
                               "a retry later (serve.request_timeout_s)", status=504) from None
        except Exception as e:
            raise RequestError("request", f"the model failed on this request ({exception_line(e)})",
                               "a retry; report it if it persists", status=500) from e

    async def _off_loop(self, fn, *args):
        """Blocking image work in a thread, a few at a time: the event loop keeps serving."""
        async with self._decode_slots:
            return await asyncio.to_thread(fn, *args)

    async def _encoded(self, fn, array: np.ndarray) -> bytes:
        return fn(array) if array.nbytes <= INLINE_ENCODE_BYTES else await self._off_loop(fn, array)

    def _fault(self, request: Request) -> str | None:
        """Test-only: the X-VDVAE-Fault header, honoured with serve.fault_injection."""
        fault = request.headers.get("x-vdvae-fault") if self.faults else None
        if fault is not None and fault not in FAULTS:
            raise RequestError("x-vdvae-fault", f"{fault[:40]!r} is unknown", " | ".join(FAULTS))
        return fault

    # --- routes -------------------------------------------------------------------------------

    @api.get("/healthz")
    async def healthz(self) -> JSONResponse:
        """200 while none of this replica's forward passes overran the timeout."""
        stuck = self._stuck()
        if stuck:
            return JSONResponse({"status": "stuck", "error": stuck}, status_code=503)
        return JSONResponse({"status": "ok", "step": self.sampler.weights.step})

    @api.get("/info")
    async def info(self) -> dict:
        return {**self.info_body, "batching": dict(self.batcher.stats)}

    @api.post("/sample", responses={200: {"description": "PNG (one image or a grid) or .npy of uint8 (N, C, H, W); "
                                          "header X-Seed", "content": {"image/png": {}, "application/x-npy": {}}}})
    async def sample(self, body: SampleRequest, request: Request) -> Response:
        job = self.limits.sample(body)
        if job["seed"] is None:  # reported back, so any result can be reproduced
            job["seed"] = secrets.randbelow(MAX_SEED + 1)
        fault = self._fault(request)
        if fault:
            job["fault"] = fault
        images = await self._answer(self.batcher.submit(job))  # batched with concurrent calls
        headers = {"X-Seed": str(job["seed"])}
        if body.format == "npy":
            return Response(await self._encoded(npy_bytes, images), media_type="application/x-npy", headers=headers)
        image = grid(images) if body.grid else images[0].transpose(1, 2, 0)
        return Response(await self._encoded(png_bytes, image), media_type="image/png", headers=headers)

    @api.post("/reconstruct", openapi_extra=_RECONSTRUCT_BODY)
    async def reconstruct(self, request: Request) -> Response:
        limits = self.limits
        kind = request.headers.get("content-type", "")
        if kind.startswith("multipart/form-data"):
            # the body limit stops the read (and the file's spooling) at serve.max_body_mb
            form = await request.form(max_files=1, max_fields=8, max_part_size=64 * 1024)
            unknown = sorted(set(form) - {"image", "depth", "temperature", "seed"})
            if unknown:
                raise RequestError(unknown[0], "unknown field", "the fields image, depth, temperature, seed")
            upload = form.get("image")
            if upload is None or isinstance(upload, str):
                raise RequestError("image", "missing (or not a file)", "an image file in the form field 'image'")
            data = await upload.read()
            depth = form_value("depth", form.get("depth"), "int")
            if depth is None:
                raise RequestError("depth", "missing", f"0..{limits.groups}")
            temperature = form_value("temperature", form.get("temperature"), "temperature")
            body = _validated(lambda: ReconstructRequest(
                image_base64="", depth=depth, temperature=1.0 if temperature is None else temperature,
                seed=form_value("seed", form.get("seed"), "int")))
        elif kind.startswith("application/json"):
            raw = await request.body()  # at most serve.max_body_mb: the middleware stops the read
            body = _validated(lambda: ReconstructRequest.model_validate_json(raw))
            data = decode_base64(body.image_base64)
        else:
            raise RequestError("content-type", f"{kind or 'none'} is not accepted",
                               "multipart/form-data (field image) or application/json (field image_base64)", status=415)
        depth = limits.depth(body.depth)  # cheap checks before decoding the upload
        temperature = limits.temperature(body.temperature)
        seed = limits.seed(body.seed)
        image = await self._off_loop(limits.image, data)
        seed = secrets.randbelow(MAX_SEED + 1) if seed is None else seed
        recon, bpd = await self._answer(asyncio.to_thread(self._locked, self.sampler.reconstruct, image, depth,
                                                          temperature, seed))
        headers = {"X-Bits-Per-Dim": f"{bpd:.6f}", "X-Depth": str(depth), "X-Seed": str(seed)}
        return Response(await self._encoded(png_bytes, recon.transpose(1, 2, 0)), media_type="image/png",
                        headers=headers)


SHUTDOWN_POLL_S = 0.5  # a stopping replica checks this often whether its requests are done


def build(model_uri: str, cfg: RunConfig):
    """The application: resources, replicas (or autoscaling), batching, timeouts and health
    checks from cfg.serve."""
    s = cfg.serve
    if s.max_replicas > s.replicas:
        scaling = {"autoscaling_config": {"min_replicas": s.replicas, "max_replicas": s.max_replicas,
                                          "target_ongoing_requests": s.max_batch_size}}
    else:
        scaling = {"num_replicas": s.replicas}
    return Service.options(
        **scaling, ray_actor_options={"num_cpus": s.cpus_per_replica, "num_gpus": s.gpus_per_replica},
        # every HTTP request of the replica counts, /healthz included: a saturated replica
        # queues requests for its batches instead of the router backing off
        max_ongoing_requests=max(1000, 2 * s.max_batch_size),
        health_check_period_s=s.health_check_period_s,
        # a replica being replaced (stuck, or scaled down) gets as long for the requests it
        # holds as any request waits for the model, and a little for the answer
        graceful_shutdown_timeout_s=s.request_timeout_s + 5,
        graceful_shutdown_wait_loop_s=SHUTDOWN_POLL_S,
    ).bind(model_uri, asdict(s))


def build_app(args: dict):
    """Serve config entry: args {model: URI, config: optional TOML/YAML path, set: ["serve.x=y", ...]}."""
    if not args.get("model"):
        raise ValueError("args.model is required: the URI of the EMA weights to serve")
    return build(str(args["model"]), load(path=args.get("config"), overrides=list(args.get("set", []))))


LOOPBACK = ("127.0.0.1", "localhost", "::1")
STOP_TIMEOUT_S = 15.0  # longest wait for Serve to stop after SIGINT/SIGTERM


def start_serve(host: str, port: int) -> bool:
    """Start Serve's HTTP proxies on host:port; True if this call started Serve. A Serve
    instance already running on the cluster with other HTTP options is an error (Serve
    itself would ignore the new ones and keep the old address)."""
    from ray.serve.context import _get_global_client  # private: the pinned ray==2.60.0's running instance

    client = _get_global_client(raise_if_no_controller_running=False)
    if client is None:
        serve.start(http_options={"host": host, "port": port})
        return True
    have = client.http_config
    if (have.host, have.port) != (host, port):
        raise ValueError(f"Serve already runs on this Ray cluster with HTTP on {have.host}:{have.port}, not on "
                         f"serve.host:serve.port = {host}:{port} as asked; allowed: --host {have.host} --port "
                         f"{have.port} (the running instance), or stop it first (`serve shutdown`)")
    return False


def run(model_uri: str, cfg: RunConfig, blocking: bool = True, stop_serve: bool = True) -> str:
    """Start Serve's HTTP proxy on serve.host:serve.port and deploy; returns the base URL.
    Blocking (main thread): serves until SIGINT or SIGTERM, then returns; with stop_serve it
    first deletes the app, and stops Serve if this call started it, so the port closes (for
    a cluster that outlives this process; a local cluster this process started goes down
    with `ray.shutdown()`, which is quicker and works even when the signal went to the
    cluster's processes as well). A second signal exits at once."""
    s = cfg.serve
    url = f"http://{s.host}:{s.port}"
    if not blocking:
        start_serve(s.host, s.port)
        serve.run(build(model_uri, cfg), name=APP_NAME, route_prefix="/", blocking=False)
        return url
    started: bool | None = None  # unknown until start_serve returns
    previous = {sig: signal.signal(sig, _stop_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    stopping = False
    try:
        started = start_serve(s.host, s.port)
        serve.run(build(model_uri, cfg), name=APP_NAME, route_prefix="/", blocking=False)
        if s.host not in LOOPBACK and not s.auth_token_env:
            print(f"warning: serving on {s.host} without authentication; set serve.auth_token_env to the name of "
                  "an environment variable holding a bearer token", flush=True)
        print(f"serving {redact_uri(model_uri)} at {url} (POST /sample, POST /reconstruct, GET /info, /healthz, "
              "/docs)", flush=True)
        while True:
            time.sleep(3600)
    except StopSignal as e:
        stopping = True  # from now on a further signal exits at once (_stop_signal)
        print(f"{signal.Signals(e.signum).name}: stopping the service", flush=True)
        if not stop_serve:
            return url

        def stop():
            if started:
                serve.shutdown()
            elif started is False:  # someone else's Serve instance: only our app
                serve.delete(APP_NAME)

        if not call_with_timeout(stop, STOP_TIMEOUT_S):
            print(f"Serve did not stop within {STOP_TIMEOUT_S:g} s", flush=True)
    finally:
        if not stopping:  # an error while starting: the caller's handlers again
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    return url


def stop_ray(timeout_s: float = 10.0) -> bool:
    """ray.shutdown(), bounded; False if the cluster was already gone or the shutdown did not
    return within timeout_s (after a SIGTERM to the whole process group, a local cluster's
    raylet drains and the driver's disconnect waits on it). The caller then exits at once: a
    local cluster's processes die with this process (Ray starts them fate-sharing)."""
    import ray

    from ..core.ray_connect import listening

    if not ray.is_initialized():
        return True
    if not listening(ray.get_runtime_context().gcs_address, timeout_s=0.5):
        return False
    return call_with_timeout(ray.shutdown, timeout_s)


def ray_started_here() -> bool:
    """True if this process started the Ray cluster it is connected to (ray.init without a
    cluster to join): then ray.shutdown() stops all of it, Serve included."""
    import ray

    node = getattr(ray._private.worker, "_global_node", None)  # private: the pinned ray==2.60.0
    return bool(node is not None and getattr(node, "head", False))


class StopSignal(BaseException):
    """SIGINT or SIGTERM while serving (a BaseException, like KeyboardInterrupt: it
    interrupts whatever the main thread does, deploying included)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _stop_signal(signum, frame):
    for sig in (signal.SIGINT, signal.SIGTERM):  # the next one exits at once
        signal.signal(sig, lambda signum, frame: os._exit(128 + signum))
    raise StopSignal(signum)


def call_with_timeout(fn, timeout_s: float) -> bool:
    """Run fn in a daemon thread; False if it did not return within timeout_s (it is left
    behind: a teardown talking to a dying cluster must not hold the process)."""
    done = threading.Event()
    errors: list[BaseException] = []

    def target():
        try:
            fn()
        except BaseException as e:  # reported, not raised: the caller is shutting down anyway
            errors.append(e)
        finally:
            done.set()

    threading.Thread(target=target, daemon=True, name="serve-stop").start()
    if not done.wait(timeout_s):
        return False
    if errors:
        print(f"while stopping: {type(errors[0]).__name__}: {errors[0]}", flush=True)
    return True
