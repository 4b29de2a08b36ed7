"""The Ray Serve application: one deployment holding the HTTP routes (FastAPI) and the model.

Each replica checks requests (body limit while the body streams in, a bound on a JSON
body's values, optional bearer token, field ranges), loads the EMA weights once, and
batches concurrent `/sample` calls into one forward pass (`batcher.py`; a failing request
fails alone). Forward passes, upload decoding and large encodings run in threads, each kind
a few at a time with a bounded number of requests waiting on the event loop (`gate.py`:
more get a 503); every wait for the model is bounded by serve.request_timeout_s.
`check_health` fails while one forward pass overruns that timeout (a long batch of passes
that keeps finishing them is not stuck), so Serve replaces a stuck replica. Routes and model share a process, so a request costs one
hop from Serve's proxy and no DeploymentHandle call (benchmarks/RESULTS.md, issue 13 item 6).
Errors are answered as JSON by `http_errors.py`. Back-pressure follows Serve's conventions
(`deployment_options`): a bounded max_ongoing_requests per replica, and requests past
max_queued_requests get Serve's own 503 with Retry-After. Batch statistics are Ray metrics
(`metrics.py`) as well as `/info`.

Built by `build(model_uri, cfg)` (`vdvae-dist serve`: replicas and resources from
cfg.serve); `build_app(args)` is the entry for Serve config files (`serve run
cluster/serve.yaml`), whose `deployments:` block sets replicas, autoscaling and resources:
Serve rescales from it without reloading the weights, while a change of args redeploys
every replica. `process.run` starts Serve, deploys this app and serves until SIGINT or SIGTERM.
"""
# no `from __future__ import annotations`: FastAPI resolves the route signatures at runtime
import asyncio
import secrets
import threading
from dataclasses import asdict

import numpy as np
import ray
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from ray import serve

from ..config import RunConfig, load
from ..config.schema import ServeConfig
from ..artifacts.images import grid, png_bytes
from .gate import Slots
from .guards import BodyLimitMiddleware, Guard, TokenAuthMiddleware, token_from_env
from .http_errors import add_error_handlers, logged_server_error, validated
from .requests import (MAX_SEED, RETRY_AFTER_S, Limits, ReconstructRequest, RequestError, SampleRequest, decode_base64, form_value,
                       npy_bytes, shown_source)
from .batcher import Batcher
from .metrics import BatchMetrics
from .sampler import FAULTS, inject_fault

APP_NAME = "vdvae"
api = FastAPI(
    title="vdvae-dist sampling service",
    description="Samples and reconstructions from a trained (Efficient-)VDVAE. Errors are JSON "
                "`{error, field, allowed}`: 4xx for a bad request (401 without the bearer token when the "
                "service has one), 500 when the model fails on a request (with a request_id to find the "
                "detail in the replica's log), 503 with Retry-After when the replica is busy (too many "
                "requests wait for the model or for upload decoding), 504 when the model does not answer "
                "within serve.request_timeout_s; /healthz answers 503 while a forward pass is stuck.")
add_error_handlers(api)
# the last added runs first: the token is checked before any of the body is read
api.add_middleware(BodyLimitMiddleware)
api.add_middleware(TokenAuthMiddleware)

# /reconstruct parses its body itself (JSON or multipart form): its OpenAPI request body and response
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
DECODE_THREADS = 2  # uploads decoded at once (each within the decode budget: requests.Limits.max_pixels)
MAX_DECODE_WAITERS = 8  # uploads waiting to be decoded (each holds its body); more get 503
ENCODE_THREADS = 2  # large results encoded at once (apart from decoding: results never wait behind uploads)
MAX_MODEL_WAITERS = 16  # /reconstruct requests waiting for the model; more get 503



@serve.deployment(name="VDVAE")
@serve.ingress(api)
class Service:
    """One replica: the HTTP routes and the model in one process, so a request costs one
    hop from Serve's proxy and no handle call. Forward passes, upload decoding and large
    encodings run in threads; the event loop only parses, checks and batches."""

    def __init__(self, model_uri: str, serve_cfg: dict):
        import torch

        from ..tracking.logged_weights import load_weights
        from .sampler import Sampler

        s = ServeConfig(**serve_cfg)
        Guard.body_bytes = int(s.max_body_mb * 2**20)
        Guard.token, Guard.token_env = token_from_env(s.auth_token_env), s.auth_token_env
        # the CPUs Ray gave this replica (ray_actor_options, from serve.cpus_per_replica or a
        # Serve config's deployments block), so threads follow the resources wherever set
        torch.set_num_threads(max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1))))
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.sampler = Sampler(load_weights(model_uri), device, max_images=max(s.max_n, s.max_batch_size))
        self.max_n, self.timeout_s, self.faults = s.max_n, s.request_timeout_s, s.fault_injection
        info = self.sampler.info()  # fixed for the replica's life: computed once, not per request
        self.info_body = {**info, "source": shown_source(info["source"]), "max_n": s.max_n,
                          "replica": serve.get_replica_context().replica_tag}
        c, h, _ = info["image_shape"]
        self.limits = Limits(s.max_n, info["latent_groups"], c, h)
        # one model call at a time (a batch, or a reconstruction); the batcher has at most one
        # run waiting, so it is never refused; reconstructions past MAX_MODEL_WAITERS are
        self.model_slot = Slots("the model", 1, MAX_MODEL_WAITERS)
        self.decode_slots = Slots("upload decoding", DECODE_THREADS, MAX_DECODE_WAITERS)
        # (encodings never wait behind uploads; a request's result is never refused: exempt)
        self.encode_slots = Slots("result encoding", ENCODE_THREADS, max_waiting=0)
        self.batcher = Batcher(lambda jobs: self.model_slot.run(self.sampler.sample_many, jobs, exempt=True),
                               s.max_batch_size, s.batch_wait_s, observe=BatchMetrics().record)

    # --- the model ----------------------------------------------------------------------------

    def _stuck(self) -> str | None:
        return self.sampler.heartbeat.stuck(self.timeout_s)

    def check_health(self) -> None:
        """Called by Serve every serve.health_check_period_s: a failure replaces the replica."""
        stuck = self._stuck()
        if stuck:
            raise RuntimeError(f"model replica stuck: {stuck}")

    async def _answer(self, work):
        """The model's answer, or 504 after serve.request_timeout_s (the wait is cancelled)."""
        try:
            return await asyncio.wait_for(work, self.timeout_s)
        except asyncio.TimeoutError:  # = TimeoutError from 3.11
            raise RequestError("request", f"the model did not answer within {self.timeout_s:g} s",
                               "a retry later (serve.request_timeout_s)", status=504) from None
        except RequestError:  # a 503 from the model's waiting line
            raise
        except Exception as e:  # the detail goes to the replica's log, not to the client
            raise logged_server_error(e, "the model failed on this request") from e

    async def _decoded(self, data: bytes, fault: str | None) -> np.ndarray:
        """The upload decoded in a thread, DECODE_THREADS at a time: the event loop keeps
        serving. A 503 when MAX_DECODE_WAITERS already wait, or no thread came within
        serve.request_timeout_s."""
        def decode():
            inject_fault(fault)
            return self.limits.image(data)

        return await self.decode_slots.run(decode, wait_s=self.timeout_s)

    async def _encoded(self, fn, array: np.ndarray) -> bytes:
        if array.nbytes <= INLINE_ENCODE_BYTES:
            return fn(array)
        return await self.encode_slots.run(fn, array, exempt=True)  # the result is made: never refused

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
        return {**self.info_body, "batching": dict(self.batcher.stats),
                "load": {"model": self.model_slot.stats, "decode": self.decode_slots.stats,
                         "encode": self.encode_slots.stats}}

    @api.post("/sample", responses={200: {"description": "PNG (one image or a grid) or .npy of uint8 (N, C, H, W); "
                                          "header X-Seed", "content": {"image/png": {}, "application/x-npy": {}}}})
    async def sample(self, body: SampleRequest, request: Request) -> Response:
        job = self.limits.sample(body)
        if job["seed"] is None:  # reported back, so any result can be reproduced
            job["seed"] = secrets.randbelow(MAX_SEED + 1)
        fault = self._fault(request)
        if fault:
            job["fault"] = fault
        job["gone"] = threading.Event()  # set if this request ends unanswered: its passes are skipped
        try:
            images = await self._answer(self.batcher.submit(job))  # batched with concurrent calls
        except BaseException:
            job["gone"].set()
            raise
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
            body = validated(lambda: ReconstructRequest(
                image_base64="", depth=depth, temperature=1.0 if temperature is None else temperature,
                seed=form_value("seed", form.get("seed"), "int")))
        elif kind.startswith("application/json"):
            raw = await request.body()  # at most serve.max_body_mb: the middleware stops the read
            body = validated(lambda: ReconstructRequest.model_validate_json(raw))
            data = decode_base64(body.image_base64)
        else:
            raise RequestError("content-type", f"{kind or 'none'} is not accepted",
                               "multipart/form-data (field image) or application/json (field image_base64)", status=415)
        depth = limits.depth(body.depth)  # cheap checks before decoding the upload
        temperature = limits.temperature(body.temperature)
        seed = limits.seed(body.seed)
        image = await self._decoded(data, self._fault(request))
        seed = secrets.randbelow(MAX_SEED + 1) if seed is None else seed
        recon, bpd = await self._answer(self.model_slot.run(self.sampler.reconstruct, image, depth, temperature, seed))
        headers = {"X-Bits-Per-Dim": f"{bpd:.6f}", "X-Depth": str(depth), "X-Seed": str(seed)}
        return Response(await self._encoded(png_bytes, recon.transpose(1, 2, 0)), media_type="image/png",
                        headers=headers)


SHUTDOWN_POLL_S = 0.5  # a stopping replica checks this often whether its requests are done
# serve.* fields that are Serve deployment options: a Serve config file sets them in its
# `deployments:` block (a change there rescales without restarting replicas), not in args
DEPLOYMENT_FIELDS = {"replicas": "num_replicas (or autoscaling_config.min_replicas)",
                     "max_replicas": "autoscaling_config.max_replicas",
                     "cpus_per_replica": "ray_actor_options.num_cpus",
                     "gpus_per_replica": "ray_actor_options.num_gpus",
                     "max_queued_requests": "max_queued_requests"}


def max_ongoing_requests(s: ServeConfig) -> int:
    """Requests a replica holds at once: one batch in the model and the next one forming.
    More would wait inside the replica, out of sight of Serve's router and autoscaler."""
    return 2 * s.max_batch_size


def deployment_options(s: ServeConfig, scaling: bool = True) -> dict:
    """Serve's options for the deployment. Back-pressure at Serve's conventions: a bounded
    max_ongoing_requests per replica, and past max_queued_requests waiting in a proxy, a
    503 with Retry-After from Serve's proxy. With scaling, replicas (or autoscaling) and
    resources come from s; without (Serve config files), one replica with one CPU unless
    the file's `deployments:` block says otherwise."""
    options = {
        "max_ongoing_requests": max_ongoing_requests(s),
        "max_queued_requests": s.max_queued_requests,
        "backpressure_config": {"status_code": 503, "retry_after_s": RETRY_AFTER_S},
        "health_check_period_s": s.health_check_period_s,
        # a replica being replaced (stuck, or scaled down) gets as long for the requests it
        # holds as any request waits for the model, and a little for the answer
        "graceful_shutdown_timeout_s": s.request_timeout_s + 5,
        "graceful_shutdown_wait_loop_s": SHUTDOWN_POLL_S,
        "ray_actor_options": {"num_cpus": s.cpus_per_replica, "num_gpus": s.gpus_per_replica},
    }
    if scaling and s.max_replicas > s.replicas:
        # a replica at its target runs one batch and has the next one waiting (half of
        # max_ongoing_requests, as Serve's own defaults pair 2 with 5)
        options["autoscaling_config"] = {"min_replicas": s.replicas, "max_replicas": s.max_replicas,
                                         "target_ongoing_requests": s.max_batch_size}
    elif scaling:
        options["num_replicas"] = s.replicas
    return options


def build(model_uri: str, cfg: RunConfig):
    """The application (`vdvae-dist serve`): replicas (or autoscaling), resources,
    back-pressure, batching, timeouts and health checks from cfg.serve."""
    return Service.options(**deployment_options(cfg.serve)).bind(model_uri, asdict(cfg.serve))


def build_app(args: dict):
    """Serve config entry: args {model: URI, config: optional TOML/YAML path, set: ["serve.x=y", ...]}.
    Replicas, autoscaling, resources and the queue limit belong in the file's `deployments:`
    block (name: Service's deployment name): changing args redeploys every replica, and each
    reloads the weights; the deployments block rescales without."""
    if not args.get("model"):
        raise ValueError("args.model is required: the URI of the EMA weights to serve")
    cfg = load(path=args.get("config"), overrides=list(args.get("set", [])))
    defaults = ServeConfig()
    for field, option in DEPLOYMENT_FIELDS.items():
        value = getattr(cfg.serve, field)
        if value != getattr(defaults, field):
            raise ValueError(
                f"serve.{field}={value!r} is not taken from a Serve config file's args (a change there reloads the "
                f"weights on every replica); allowed: {option} in the file's deployments: block (- name: "
                f"{Service.name}), which Serve applies without reloading them")
    s = cfg.serve
    return Service.options(**deployment_options(s, scaling=False)).bind(str(args["model"]), asdict(s))
