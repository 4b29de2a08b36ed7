"""Request schemas, their checks against the loaded model, and image encoding (no Ray).

Every rejected input becomes a `RequestError` naming the field and the allowed values;
the ingress turns it into a JSON 4xx response.
"""
from __future__ import annotations

import base64
import binascii
import io
import json
import math
from typing import Literal

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

MAX_SEED = 2**63 - 1
MAX_UPLOAD_PIXELS = 40_000_000  # decoded size cap: a small file may expand to a huge image


class BodyLimit:
    """Largest request body, set by the ingress replica from serve.max_body_mb. Lives here,
    in a module imported by reference, because Serve ships the ingress class by value."""

    bytes = 16 * 2**20


class RequestError(ValueError):
    def __init__(self, field: str, error: str, allowed: str, status: int = 422):
        super().__init__(f"{field}: {error}; allowed: {allowed}")
        self.field, self.error, self.allowed, self.status = field, error, allowed, status

    def body(self) -> dict:
        return {"error": self.error, "field": self.field, "allowed": self.allowed}


class SampleRequest(BaseModel):
    """POST /sample"""

    model_config = ConfigDict(extra="forbid")
    n: int = Field(1, description="number of images, 1..serve.max_n")
    temperature: float | list[float] = Field(
        1.0, description="prior temperature: one value, or one per latent group (see /info)")
    seed: int | None = Field(None, description="0..2^63-1; the same seed gives the same images")
    format: Literal["png", "npy"] = Field("png", description="png (one image or a grid) or npy (uint8 N,C,H,W)")
    grid: bool = Field(True, description="png only: all images in one grid; false requires n = 1")


class ReconstructRequest(BaseModel):
    """POST /reconstruct as JSON (or the same fields as multipart form data with an `image` file)."""

    model_config = ConfigDict(extra="forbid")
    image_base64: str = Field(description="the image file (PNG, JPEG, ...) base64-encoded")
    depth: int = Field(description="latent groups taken from the posterior, 0..groups (see /info)")
    temperature: float | list[float] = Field(1.0, description="prior temperature for the groups below depth")
    seed: int | None = Field(None, description="0..2^63-1")


class Limits:
    """What the loaded model and the serve config allow."""

    def __init__(self, max_n: int, groups: int, channels: int, resolution: int):
        self.max_n, self.groups, self.channels, self.resolution = max_n, groups, channels, resolution

    def temperature(self, value: float | list[float]) -> list[float]:
        allowed = f"a number >= 0, or a list of exactly {self.groups} numbers >= 0 (one per latent group)"
        values = [value] if isinstance(value, (int, float)) else list(value)
        if not isinstance(value, (int, float)) and len(values) != self.groups:
            raise RequestError("temperature", f"{len(values)} values given", allowed)
        if any(not (math.isfinite(t) and t >= 0) for t in values):
            raise RequestError("temperature", f"{value!r} is out of range", allowed)
        return [float(t) for t in values] * (self.groups if len(values) == 1 else 1)

    def seed(self, value: int | None) -> int | None:
        if value is not None and not 0 <= value <= MAX_SEED:
            raise RequestError("seed", f"{value} is out of range", f"0..{MAX_SEED}")
        return value

    def sample(self, r: SampleRequest) -> dict:
        if not 1 <= r.n <= self.max_n:
            raise RequestError("n", f"{r.n} is out of range", f"1..{self.max_n}")
        if r.format == "png" and not r.grid and r.n != 1:
            raise RequestError("grid", "false with n > 1 (one PNG holds one image)", "true, or n = 1, or format npy")
        return {"n": r.n, "temperature": self.temperature(r.temperature), "seed": self.seed(r.seed)}

    def depth(self, value: int) -> int:
        if not 0 <= value <= self.groups:
            raise RequestError("depth", f"{value} is out of range", f"0..{self.groups}")
        return value

    def image(self, data: bytes) -> np.ndarray:
        """An uploaded image file -> uint8 (C, H, W) at the model's resolution, resized
        (shorter side) and centre-cropped as the shard builders prepare training images."""
        from ..data.readers import resize_center_crop

        try:
            img = Image.open(io.BytesIO(data))
            if img.width * img.height > MAX_UPLOAD_PIXELS:
                raise RequestError("image", f"{img.width}x{img.height} pixels is too large",
                                   f"at most {MAX_UPLOAD_PIXELS:,} pixels")
            img.load()
        except RequestError:
            raise
        except Exception as e:  # anything PIL cannot decode
            raise RequestError("image", f"not a decodable image ({type(e).__name__})",
                               "a PNG, JPEG, WebP, BMP or GIF file", status=400) from e
        rgb_HWC = resize_center_crop(img, self.resolution)
        if self.channels == 1:
            return np.asarray(Image.fromarray(rgb_HWC).convert("L"))[None]
        return rgb_HWC.transpose(2, 0, 1).copy()


def decode_base64(value: str) -> bytes:
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as e:
        raise RequestError("image_base64", "not valid base64", "a base64-encoded image file", status=400) from e


def form_value(field: str, raw: str | None, kind: str):
    """Multipart form fields arrive as text: numbers, or a JSON list for per-group temperatures."""
    if raw is None:
        return None
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    ok = {"int": isinstance(value, int) and not isinstance(value, bool),
          "temperature": isinstance(value, (int, float)) and not isinstance(value, bool)
          or isinstance(value, list) and all(isinstance(v, (int, float)) for v in value)}[kind]
    if not ok:
        allowed = "an integer" if kind == "int" else "a number or a JSON list of numbers"
        raise RequestError(field, f"{raw!r} is not {allowed}", allowed)
    return value


def png_bytes(image_HWC: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image_HWC.squeeze(-1) if image_HWC.shape[-1] == 1 else image_HWC).save(buf, format="PNG")
    return buf.getvalue()


def npy_bytes(images_NCHW: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, images_NCHW, allow_pickle=False)
    return buf.getvalue()
