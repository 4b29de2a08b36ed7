"""The Ray Serve application: an HTTP ingress (FastAPI) and a model deployment.

The ingress validates requests and encodes images; the model deployment loads the EMA
weights once per replica and answers `sample` through `@serve.batch`, so concurrent small
requests share one forward pass. Built by `build(model_uri, cfg)`; `build_app(args)` is
the entry for Serve config files (`serve run cluster/serve.yaml`).
"""
# no `from __future__ import annotations`: FastAPI resolves the route signatures at runtime
import asyncio
import secrets
import threading
from dataclasses import asdict

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from ray import serve
from ray.serve.handle import DeploymentHandle

from ..config import RunConfig, load
from ..config.schema import ServeConfig
from ..artifacts.images import grid
from .requests import (MAX_SEED, BodyLimit, Limits, ReconstructRequest, RequestError, SampleRequest, decode_base64,
                       form_value, npy_bytes, png_bytes)

APP_NAME = "vdvae"
api = FastAPI(
    title="vdvae-dist sampling service",
    description="Samples and reconstructions from a trained (Efficient-)VDVAE. Errors are JSON "
                "`{error, field, allowed}` with a 4xx status.")
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


@api.middleware("http")
async def _limit_body(request: Request, call_next):
    length = request.headers.get("content-length")
    limit = BodyLimit.bytes
    if length is not None and length.isdigit() and int(length) > limit:
        return JSONResponse({"error": f"a body of {int(length):,} bytes is too large", "field": "body",
                             "allowed": f"at most {limit:,} bytes (serve.max_body_mb)"}, status_code=413)
    return await call_next(request)


def _validated(build):
    """Pydantic models built by hand report like the ones FastAPI parses (JSON 422)."""
    try:
        return build()
    except ValidationError as e:
        raise RequestValidationError(e.errors()) from e


@serve.deployment(name="VDVAEModel")
class ModelDeployment:
    """One replica: the weights on its device, torch threads = its CPUs, one forward at a time."""

    def __init__(self, model_uri: str, serve_cfg: dict):
        import torch

        from ..artifacts.weights import load_weights
        from .sampler import Sampler

        s = ServeConfig(**serve_cfg)
        torch.set_num_threads(max(1, int(s.cpus_per_replica)))
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.sampler = Sampler(load_weights(model_uri), device, max_images=max(s.max_n, s.max_batch_size))
        self._lock = threading.Lock()
        self.stats = {"forward_requests": 0, "batches": 0, "largest_batch": 0}
        self.sample_batch.set_max_batch_size(s.max_batch_size)
        self.sample_batch.set_batch_wait_timeout_s(s.batch_wait_s)

    def info(self) -> dict:
        return {**self.sampler.info(), "batching": dict(self.stats)}

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01)  # replaced from the config in __init__
    async def sample_batch(self, jobs: list[dict]) -> list[np.ndarray]:
        self.stats["batches"] += 1
        self.stats["forward_requests"] += len(jobs)
        self.stats["largest_batch"] = max(self.stats["largest_batch"], len(jobs))
        return await asyncio.to_thread(self._locked, self.sampler.sample_many, jobs)

    async def reconstruct(self, image_CHW: np.ndarray, depth: int, temperature: list[float], seed: int):
        return await asyncio.to_thread(self._locked, self.sampler.reconstruct, image_CHW, depth, temperature, seed)

    def _locked(self, fn, *args):
        with self._lock:  # the event loop stays free to collect the next batch meanwhile
            return fn(*args)


_RECONSTRUCT_BODY = {"requestBody": {"content": {
    "application/json": {"schema": ReconstructRequest.model_json_schema()},
    "multipart/form-data": {"schema": {"type": "object", "required": ["image", "depth"], "properties": {
        "image": {"type": "string", "format": "binary"}, "depth": {"type": "integer"},
        "temperature": {"type": "string", "description": "a number or a JSON list of numbers"},
        "seed": {"type": "integer"}}}}}},
    "responses": {"200": {"description": "the reconstruction as PNG; headers X-Bits-Per-Dim (of the "
                          "uploaded image under the model), X-Depth, X-Seed",
                          "content": {"image/png": {}}}}}


@serve.deployment(name="Ingress")
@serve.ingress(api)
class Ingress:
    def __init__(self, model: DeploymentHandle, max_n: int, max_body_bytes: int):
        self.model, self.max_n = model, max_n
        BodyLimit.bytes = max_body_bytes
        self._limits: Limits | None = None

    async def limits(self) -> Limits:
        if self._limits is None:
            info = await self.model.info.remote()
            c, h, _ = info["image_shape"]
            self._limits = Limits(self.max_n, info["latent_groups"], c, h)
        return self._limits

    @api.get("/healthz")
    async def healthz(self) -> dict:
        info = await self.model.info.remote()
        return {"status": "ok", "step": info["step"]}

    @api.get("/info")
    async def info(self) -> dict:
        return {**(await self.model.info.remote()), "max_n": self.max_n}

    @api.post("/sample", responses={200: {"description": "PNG (one image or a grid) or .npy of uint8 (N, C, H, W); "
                                          "header X-Seed", "content": {"image/png": {}, "application/x-npy": {}}}})
    async def sample(self, body: SampleRequest) -> Response:
        job = (await self.limits()).sample(body)
        if job["seed"] is None:  # reported back, so any result can be reproduced
            job["seed"] = secrets.randbelow(MAX_SEED + 1)
        images = await self.model.sample_batch.remote(job)  # batched with concurrent calls
        headers = {"X-Seed": str(job["seed"])}
        if body.format == "npy":
            return Response(npy_bytes(images), media_type="application/x-npy", headers=headers)
        image = grid(images) if body.grid else images[0].transpose(1, 2, 0)
        return Response(png_bytes(image), media_type="image/png", headers=headers)

    @api.post("/reconstruct", openapi_extra=_RECONSTRUCT_BODY)
    async def reconstruct(self, request: Request) -> Response:
        limits = await self.limits()
        kind = request.headers.get("content-type", "")
        if kind.startswith("multipart/form-data"):
            form = await request.form(max_files=1, max_fields=8, max_part_size=BodyLimit.bytes)
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
            raw = await request.body()
            if len(raw) > BodyLimit.bytes:
                raise RequestError("body", f"a body of {len(raw):,} bytes is too large",
                                   f"at most {BodyLimit.bytes:,} bytes", status=413)
            body = _validated(lambda: ReconstructRequest.model_validate_json(raw))
            data = decode_base64(body.image_base64)
        else:
            raise RequestError("content-type", f"{kind or 'none'} is not accepted",
                               "multipart/form-data (field image) or application/json (field image_base64)", status=415)
        if len(data) > BodyLimit.bytes:
            raise RequestError("image", f"{len(data):,} bytes is too large",
                               f"at most {BodyLimit.bytes:,} bytes", status=413)
        depth = limits.depth(body.depth)  # cheap checks before decoding the upload
        temperature = limits.temperature(body.temperature)
        seed = limits.seed(body.seed)
        image = limits.image(data)
        seed = secrets.randbelow(MAX_SEED + 1) if seed is None else seed
        recon, bpd = await self.model.reconstruct.remote(image, depth, temperature, seed)
        headers = {"X-Bits-Per-Dim": f"{bpd:.6f}", "X-Depth": str(depth), "X-Seed": str(seed)}
        return Response(png_bytes(recon.transpose(1, 2, 0)), media_type="image/png", headers=headers)


def build(model_uri: str, cfg: RunConfig):
    """The application: resources, replicas (or autoscaling) and batching from cfg.serve."""
    s = cfg.serve
    if s.max_replicas > s.replicas:
        scaling = {"autoscaling_config": {"min_replicas": s.replicas, "max_replicas": s.max_replicas,
                                          "target_ongoing_requests": s.max_batch_size}}
    else:
        scaling = {"num_replicas": s.replicas}
    model = ModelDeployment.options(
        **scaling, ray_actor_options={"num_cpus": s.cpus_per_replica, "num_gpus": s.gpus_per_replica},
        # room to fill a batch while one runs; the same floor with batching off, so a
        # saturated replica queues requests instead of the router backing off
        max_ongoing_requests=max(64, 2 * s.max_batch_size),
    ).bind(model_uri, asdict(s))
    return Ingress.options(ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=1000).bind(
        model, s.max_n, int(s.max_body_mb * 2**20))


def build_app(args: dict):
    """Serve config entry: args {model: URI, config: optional TOML/YAML path, set: ["serve.x=y", ...]}."""
    if not args.get("model"):
        raise ValueError("args.model is required: the URI of the EMA weights to serve")
    return build(str(args["model"]), load(path=args.get("config"), overrides=list(args.get("set", []))))


def run(model_uri: str, cfg: RunConfig, blocking: bool = True) -> str:
    """Start Serve's HTTP proxy on serve.host:serve.port and deploy; returns the base URL."""
    serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port})
    serve.run(build(model_uri, cfg), name=APP_NAME, route_prefix="/", blocking=False)
    url = f"http://{cfg.serve.host}:{cfg.serve.port}"
    if blocking:
        print(f"serving {model_uri} at {url} (POST /sample, POST /reconstruct, GET /info, /healthz, /docs)",
              flush=True)
        threading.Event().wait()
    return url
